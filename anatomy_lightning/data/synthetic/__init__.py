"""Seeded synthetic surgical scenes: an offline benchmark that a tiny VLM can learn with GRPO on CPU.

`looks` holds the vocabulary (anatomy names, families, colours and textures of benchmarks v1, v2
and v3, and why each exists), `scenes` the generator of scenes and questions, `files` the JSONL /
PNG writer. Everything public is re-exported here, so callers import from `data.synthetic`.
"""

from anatomy_lightning.data.synthetic import files, looks, scenes
from anatomy_lightning.data.synthetic.files import *  # noqa: F403
from anatomy_lightning.data.synthetic.looks import *  # noqa: F403
from anatomy_lightning.data.synthetic.scenes import *  # noqa: F403

__all__ = [*files.__all__, *looks.__all__, *scenes.__all__]
