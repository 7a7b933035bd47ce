"""The DataModule's nested settings, `data.synthetic` and `data.similarity`: plain dataclasses the CLI
fills from YAML and Python callers may pass as dicts (see `settings.coerce_settings`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from anatomy_lightning.data.prompts import PROMPTS
from anatomy_lightning.data.similarity import check_aggregation
from anatomy_lightning.data.stages import STAGINGS

__all__ = ["ON_BAD_RECORD", "RENAMED_KEYS", "TEST_SPLITS", "SimilaritySettings", "SyntheticSettings",
           "check_data_arguments"]

ON_BAD_RECORD = ("error", "skip")  # data.on_bad_record
TEST_SPLITS = ("heldout",)  # data.test_split, besides null

RENAMED_KEYS = {  # the flat keys before data.similarity
    "similarity_encoder": "data.similarity.encoder",
    "similarity_aggregation": "data.similarity.aggregation",
    "embedding_cache_dir": "data.similarity.cache_dir",
}


@dataclass
class SyntheticSettings:
    """The built-in offline benchmark: seeded surgical scenes written as generic JSONL.

    Args:
        n_train: training questions to write.
        n_val: validation questions to write.
        n_test: test questions to write.
        seed: seed of the scenes, questions and distractors.
        image_size: side of the square frames, in pixels.
        grid: scenes are grid x grid cells, one anatomy each (1 = one anatomy per frame).
        num_options: answer options per question.
        kinds: question kinds: position, relation, tool.
        questions_per_scene: questions asked about each scene.
        unique_scenes: never repeat a layout (a 1x1 grid has only as many layouts as anatomies: set false).
        out_dir: folder the JSONL files and images are written to.
    """

    n_train: int = 512
    n_val: int = 96
    n_test: int = 192
    seed: int = 0
    image_size: int = 56
    grid: int = 2
    num_options: int = 4
    kinds: tuple[str, ...] = ("position", "relation")  # question kinds: position, relation, tool
    questions_per_scene: int = 2
    unique_scenes: bool = True  # grid 1 has only as many layouts as anatomies: set false there
    out_dir: str = "outputs/synthetic"
    benchmark: str = "v1"  # v2: alike-named anatomies also look alike (docs/benchmark_v2); v3: every class easy and hard (docs/benchmark_v3)


@dataclass
class SimilaritySettings:
    """S(q), the curriculum's difficulty measure, and how it is cut into stages.

    Args:
        encoder: sentence encoder for S(q): None = all-MiniLM-L6-v2 (offline package), or a folder / hub id.
        aggregation: all_pairs (mean cosine over every pair of options, gold-blind) | all_pairs_max |
            gold_mean (the paper's S(q): gold vs each distractor) | gold_max.
        stages: per_class (S(q) quantiles within each gold class, so every class is in every stage) |
            global (one set of quantiles: on SGG-VQA this makes stages a partition of classes).
        cache_dir: where option embeddings are cached (default: $ANATOMY_LIGHTNING_CACHE).
    """

    encoder: str | None = None
    aggregation: str = "all_pairs"
    stages: str = "per_class"
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        self.aggregation = check_aggregation(self.aggregation)
        if self.stages not in STAGINGS:
            raise ValueError(f"data.similarity.stages must be one of {list(STAGINGS)}, got {self.stages!r}")


def check_data_arguments(
    retired: Mapping[str, Any], *, has_source: bool, prompt: str, on_bad_record: str, test_split: str | None,
    test_fraction: float,
) -> None:
    """Refuse DataModule arguments no run can use, naming the setting, before anything is read.

    `retired`: the values of the `RENAMED_KEYS` arguments (None = not given); `has_source`: a
    train_file, a test_file or synthetic data is set.
    """
    for key, value in retired.items():
        if value is not None:
            raise ValueError(f"data.{key} was renamed: use {RENAMED_KEYS[key]}")
    if not has_source:
        raise ValueError("data: set `train_file` (and optionally val_file/test_file) or `synthetic`")
    if prompt not in PROMPTS:
        raise ValueError(f"data.prompt must be one of {list(PROMPTS)}, got {prompt!r}")
    if on_bad_record not in ON_BAD_RECORD:
        raise ValueError(f"data.on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
    if test_split is not None and test_split not in TEST_SPLITS:
        raise ValueError(f"data.test_split must be null (test needs data.test_file) or 'heldout', got {test_split!r}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"data.test_fraction must be between 0 and 1, got {test_fraction}")
