"""Group Diversity Question Augmentation: rewriters, diverse selection, and the rewrite queue."""

from anatomy_lightning.augment.augmenter import (
    DETECT_RULES,
    GroupDiversityAugmenter,
    group_signal_stats,
    hard_groups,
)
from anatomy_lightning.augment.rewriters import (
    REWRITERS,
    AnswerForm,
    Chain,
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
    "DETECT_RULES",
    "REWRITERS",
    "AnswerForm",
    "Chain",
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
    "parse_stem",
    "select_diverse",
]
