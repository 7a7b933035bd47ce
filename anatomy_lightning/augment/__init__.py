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
from anatomy_lightning.augment.rewriters import (
    REWRITERS,
    AnswerForm,
    Chain,
    ContrastCue,
    EliminateOptions,
    InvertRelation,
    LocalModelRewriter,
    Rewriter,
    ShuffleOptions,
    TemplateParaphrase,
    build_rewriter,
    build_rewriters,
    parse_stem,
)
from anatomy_lightning.augment.selection import select_diverse

__all__ = [
    "DEFAULT_DETECT",
    "DEFAULT_REWRITERS",
    "DETECT_RULES",
    "WHEN",
    "REWRITERS",
    "AnswerForm",
    "Chain",
    "ContrastCue",
    "EliminateOptions",
    "GroupDiversityAugmenter",
    "InvertRelation",
    "LocalModelRewriter",
    "Rewriter",
    "ShuffleOptions",
    "TemplateParaphrase",
    "build_rewriter",
    "build_rewriters",
    "group_signal_stats",
    "hard_groups",
    "hard_order",
    "parse_stem",
    "select_diverse",
]
