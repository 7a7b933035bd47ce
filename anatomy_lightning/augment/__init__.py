"""Group Diversity Question Augmentation: rewriters, diverse selection, and the rewrite queue."""

from anatomy_lightning.augment.augmenter import (
    DEFAULT_DETECT,
    DEFAULT_REWRITERS,
    DETECT_RULES,
    WHEN,
    GroupDiversityAugmenter,
    group_signal_stats,
    hard_groups,
    hard_order,
)
from anatomy_lightning.augment.llm import LocalModelRewriter, validate_generated
from anatomy_lightning.augment.registry import REWRITERS, Chain, Rewriter, build_rewriter, build_rewriters
from anatomy_lightning.augment.rules import (
    AnswerForm,
    ContrastCue,
    EliminateOptions,
    InvertRelation,
    ShuffleOptions,
    TemplateParaphrase,
    derive,
    distractors_by_nearness,
)
from anatomy_lightning.augment.stem import Clause, ParsedStem, parse_stem
from anatomy_lightning.augment.selection import select_diverse

__all__ = [
    "DEFAULT_DETECT",
    "DEFAULT_REWRITERS",
    "DETECT_RULES",
    "WHEN",
    "REWRITERS",
    "AnswerForm",
    "Chain",
    "Clause",
    "ContrastCue",
    "EliminateOptions",
    "GroupDiversityAugmenter",
    "InvertRelation",
    "LocalModelRewriter",
    "ParsedStem",
    "Rewriter",
    "ShuffleOptions",
    "TemplateParaphrase",
    "build_rewriter",
    "build_rewriters",
    "derive",
    "distractors_by_nearness",
    "group_signal_stats",
    "hard_groups",
    "hard_order",
    "parse_stem",
    "select_diverse",
    "validate_generated",
]
