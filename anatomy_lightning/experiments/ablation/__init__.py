"""Ablation of the Anatomy-R1 ideas on the synthetic benchmark: plain GRPO, the anatomical similarity
curriculum, group diversity augmentation, both, and dynamic sampling, at equal compute (the same budget
of sampled completions), over several seeds, each tested on the same held-out questions.

    python -m anatomy_lightning.experiments.ablation [--config configs/demo.yaml] [--out outputs/ablation]
        [--seeds 0 1 2] [--arms grpo curriculum ...] [--max-steps N] [--warm-start-steps 300]
        [--quick] [--force] [--no-test] [other args, passed to every fit/test call]

writes `<out>/REPORT.md` (tables, findings in words, figures), `<out>/results.json` (every number) and
the PNGs. Modules: `arms` (arms, settings, derived configs), `runs` (running and caching, reading
results), `stats` (mean ± SE, paired differences, curves), `figures`, `report`; `__main__` the command.
"""

from anatomy_lightning.experiments.ablation.arms import (
    ALL_RIGHT,
    ALL_WRONG,
    ARMS,
    ARM_OVERRIDES,
    AUGMENTATION,
    BUDGET,
    COMPLETIONS,
    CURRICULUM,
    INVALID,
    QUICK_OVERRIDES,
    SIGNAL_LOGGER,
    Settings,
    callback_section,
    completion_budget,
    derive_config,
    get_checkpoint_dir,
    get_key,
    load_base,
    run_name_of,
    set_key,
    write_yaml,
)
from anatomy_lightning.experiments.ablation.report import accuracy_findings, summarise
from anatomy_lightning.experiments.ablation.runs import (
    accuracy_from_predictions,
    read_scalars,
    run_ablation,
    validation_summary,
)
from anatomy_lightning.experiments.ablation.stats import (
    accuracy_table,
    against_completions,
    aggregate_curve,
    describe,
    difference_noise,
    mean_std,
    moving_average,
)

__all__ = [
    "ALL_RIGHT", "ALL_WRONG", "ARM_OVERRIDES", "ARMS", "AUGMENTATION", "BUDGET", "COMPLETIONS", "CURRICULUM", "INVALID",
    "QUICK_OVERRIDES", "SIGNAL_LOGGER", "Settings", "accuracy_findings", "accuracy_from_predictions",
    "accuracy_table", "against_completions", "aggregate_curve", "callback_section", "completion_budget",
    "derive_config", "describe", "difference_noise", "get_checkpoint_dir", "get_key", "load_base", "mean_std",
    "moving_average", "read_scalars", "run_ablation", "run_name_of", "set_key", "summarise", "validation_summary",
    "write_yaml",
]
