"""Seeded synthetic surgical scenes: an offline benchmark that a tiny VLM can learn with GRPO on CPU.

`looks` holds the vocabulary (anatomy names, families, colours and textures of benchmarks v1, v2
and v3, and why each exists), `scenes` the generator of scenes and questions, `files` the JSONL /
PNG writer. Everything public is re-exported here, so callers import from `data.synthetic`.
"""

from anatomy_lightning.data.synthetic.files import write_synthetic_dataset, write_synthetic_split
from anatomy_lightning.data.synthetic.looks import (
    ANATOMIES,
    BENCHMARKS,
    BY_NAME,
    FAMILIES,
    V2_GAIN,
    V2_LOOKALIKE_GAP,
    V2_LOOKALIKE_GROUPS,
    V2_LOOKS,
    V2_TINT_SIGMA,
    V3_AMBIGUOUS,
    V3_ANATOMIES,
    V3_BY_NAME,
    V3_CLEAR,
    V3_CLEAR_GAP,
    V3_DIM,
    V3_HARD_SHARE,
    V3_PAIRS,
    V3_TWIN_GAP,
    Anatomy,
)
from anatomy_lightning.data.synthetic.scenes import (
    FORMAT_VERSION,
    KINDS,
    RELATIONS,
    TEXTURE_DEPTH,
    TOOL_NAME,
    TOOL_RGB,
    Scene,
    SceneGenerator,
    position_name,
)

__all__ = [
    "ANATOMIES",
    "BENCHMARKS",
    "BY_NAME",
    "FAMILIES",
    "FORMAT_VERSION",
    "KINDS",
    "RELATIONS",
    "TEXTURE_DEPTH",
    "TOOL_NAME",
    "TOOL_RGB",
    "V2_GAIN",
    "V2_LOOKALIKE_GAP",
    "V2_LOOKALIKE_GROUPS",
    "V2_LOOKS",
    "V2_TINT_SIGMA",
    "V3_AMBIGUOUS",
    "V3_ANATOMIES",
    "V3_BY_NAME",
    "V3_CLEAR",
    "V3_CLEAR_GAP",
    "V3_DIM",
    "V3_HARD_SHARE",
    "V3_PAIRS",
    "V3_TWIN_GAP",
    "Anatomy",
    "Scene",
    "SceneGenerator",
    "position_name",
    "write_synthetic_dataset",
    "write_synthetic_split",
]
