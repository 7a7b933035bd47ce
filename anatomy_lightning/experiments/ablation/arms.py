"""What the ablation runs: the arms, the settings of one ablation, and the config each run is given.

Every run gets its own derived YAML (the base config with the arm's switches set): a LightningCLI
`trainer.callbacks` list cannot be edited entry by entry from the command line. The derived configs
are also what a finished run's cache is keyed by (`runs.run_arm`): changing what `derive_config`
writes reruns every cached run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ARMS: dict[str, tuple[bool, bool, bool]] = {  # arm -> (curriculum, augmentation, dynamic sampling)
    "grpo": (False, False, False),
    "curriculum": (True, False, False),
    "augmentation": (False, True, False),
    "both": (True, True, False),
    "dynamic": (False, False, True),  # ms-swift's dynamic_sample: resample no-signal groups in the step
    "curriculum_v2": (True, False, False),  # the reference: S(q) and hard promotion as before issue 20
}
# settings an arm carries on top of the base config (dotted keys); `--pacing` does not reach these
# arms' curriculum. curriculum_v2: gold-vs-distractor S(q), global terciles, cumulative stages
# promoted on validation with ablation v2's tuned pacing (docs/ablation_v2).
ARM_OVERRIDES: dict[str, dict[str, Any]] = {
    "curriculum_v2": {
        "data.similarity.aggregation": "gold_mean",
        "data.similarity.stages": "global",
        "curriculum.mode": "cumulative",
        "curriculum.pacing": "adaptive",
        "curriculum.promote_at": 0.7,
        "curriculum.patience": 4,
        "curriculum.max_steps_per_stage": 120,
    },
}
CURRICULUM = "anatomy_lightning.callbacks.curriculum.CurriculumCallback"
AUGMENTATION = "anatomy_lightning.callbacks.augmentation.GroupDiversityCallback"
SIGNAL_LOGGER = "anatomy_lightning.callbacks.group_signal.GroupSignalLogger"
BUDGET = "anatomy_lightning.callbacks.budget.CompletionBudget"
SECTIONS = {CURRICULUM: "curriculum", AUGMENTATION: "augmentation"}  # their top-level config sections

# TensorBoard tags the report reads. GroupSignalLogger (in every arm) logs the invalid gradient ratio
# (share of groups with zero reward spread), overall and per anatomy ("<tag>/<anatomy>"), split into
# all-wrong groups (no signal on a question the policy cannot answer) and all-right ones.
INVALID = "signal/invalid_gradient_ratio"
ALL_WRONG = "signal/invalid_all_wrong"
ALL_RIGHT = "signal/invalid_all_right"
COMPLETIONS = "train/completions"  # step -> completions sampled so far (every rank and resampling round)
# tags kept in results.json (prefix match)
TAG_PREFIXES = (
    "train/reward", "train/invalid_gradient_ratio", "train/completions", "train/dynamic_sample/", "curriculum/",
    "signal/", "augment/", "val/acc",
)

# --quick: a smoke test of the whole pipeline (every arm, 1 seed) in a few minutes on a free CPU;
# its numbers mean nothing (the policy barely leaves the warm start)
QUICK_OVERRIDES: dict[str, Any] = {
    "trainer.max_steps": 2,
    "trainer.val_check_interval": 2,  # one validation, at the end
    "data.synthetic.n_train": 32,
    "data.synthetic.n_val": 6,
    "data.synthetic.n_test": 12,
    "data.batch_size": 2,
    "data.eval_batch_size": 16,
    "model.num_generations": 2,
    "model.max_new_tokens": 10,
}
QUICK_CURRICULUM = {"max_steps_per_stage": 1}  # so the quick run promotes at least once
# jaccard: diverse-subset selection without loading MiniLM; max_fraction 0.5: with 2 prompts per
# batch the default 0.25 would inject nothing
QUICK_AUGMENTATION = {"encoder": "jaccard", "max_fraction": 0.5}
QUICK_WARM_START = {"steps": 4, "batch_size": 4}


@dataclass
class Settings:
    """What one ablation run is: paths, seeds, arms and the overrides applied to the base config."""

    config: Path
    out: Path
    seeds: list[int]
    arms: list[str]
    max_steps: int | None = None
    warm_start_steps: int = 300  # as the demo
    quick: bool = False
    force: bool = False
    test: bool = True  # False: fit only (pacing is tuned on validation, never on test)
    pacing: dict[str, Any] = field(default_factory=dict)  # curriculum settings of the curriculum arms
    extra: list[str] = field(default_factory=list)  # passed through to every fit/test call


def warm_start_sizes(settings: Settings) -> dict[str, int]:
    """The arguments of the shared format warm start that the settings choose."""
    return dict(QUICK_WARM_START) if settings.quick else {"steps": settings.warm_start_steps}


def set_key(cfg: dict[str, Any], dotted: str, value: Any) -> None:
    """`cfg["a"]["b"] = value` for "a.b", creating missing mappings."""
    *parents, last = dotted.split(".")
    node = cfg
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value


def get_key(cfg: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = cfg
    for key in dotted.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return default
        node = node[key]
    return node


def load_base(settings: Settings) -> dict[str, Any]:
    """The user's config as a plain dict (interpolations such as ${run_name} kept), with the
    settings that are the same for every run: step budget, output folders, --quick sizes."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(settings.config), resolve=False)
    assert isinstance(cfg, dict)
    overrides: dict[str, Any] = dict(QUICK_OVERRIDES) if settings.quick else {}
    if settings.max_steps is not None:
        overrides["trainer.max_steps"] = settings.max_steps
    for key, value in overrides.items():
        set_key(cfg, key, value)
    out = settings.out.resolve()
    # the data lives with the ablation so a concurrent demo (outputs/synthetic) cannot rewrite it
    set_key(cfg, "data.synthetic.out_dir", str(out / "synthetic"))
    set_key(cfg, "trainer.default_root_dir", str(out / "runs" / "${run_name}"))
    if get_key(cfg, "trainer.logger.class_path", "").endswith("TensorBoardLogger"):
        set_key(cfg, "trainer.logger.init_args.save_dir", str(out / "tensorboard"))
    else:
        raise ValueError(
            f"{settings.config}: the ablation reads TensorBoard files; trainer.logger must be a TensorBoardLogger"
        )
    if not get_key(cfg, "trainer.max_steps"):
        raise ValueError(
            f"{settings.config}: set trainer.max_steps (or --max-steps); equal compute needs a step budget"
        )
    return cfg


def callback_section(cfg: dict[str, Any], class_path: str) -> dict[str, Any]:
    """The settings of the curriculum or the augmentation: its top-level section (made if absent)."""
    section = cfg.get(SECTIONS[class_path])
    if not isinstance(section, dict):
        section = cfg[SECTIONS[class_path]] = {}
    return section


def derive_config(
    base: dict[str, Any], arm: str, seed: int, run_name: str, phase: str, quick: bool,
    pacing: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The config of one run: `base` with the arm's callbacks switched, the run's seed and name, the
    signal logger added and a checkpoint exactly at max_steps. `phase` ("fit"/"test") names the
    TensorBoard version folder, so the training curves of a run are in `<run_name>/fit`. `pacing`
    (curriculum settings, e.g. chosen on validation) reaches the arms with the curriculum on only,
    so the other arms' configs, and their cached runs, do not depend on it."""
    cfg = json.loads(json.dumps(base))  # deep copy of plain data
    curriculum_on, augmentation_on, dynamic_on = ARMS[arm]
    cfg["run_name"], cfg["seed_everything"] = run_name, seed
    set_key(cfg, "data.seed", seed)  # the sampler's order and the resampling draws vary with the seed too
    set_key(cfg, "trainer.logger.init_args.version", phase)
    curriculum = callback_section(cfg, CURRICULUM)
    curriculum["enabled"] = curriculum_on
    if quick:
        curriculum.update(QUICK_CURRICULUM)
    if curriculum_on and pacing and arm not in ARM_OVERRIDES:
        curriculum.update(pacing)
    for key, value in ARM_OVERRIDES.get(arm, {}).items():
        set_key(cfg, key, value)
    augmentation = callback_section(cfg, AUGMENTATION)
    augmentation["enabled"], augmentation["seed"] = augmentation_on, seed
    if quick:
        augmentation.update(QUICK_AUGMENTATION)
    # equal compute = equal sampled completions: every arm stops at the same budget; the dynamic arm
    # samples more per step, so it gets the steps its resampling rounds could need
    budget = completion_budget(cfg)
    set_key(cfg, "model.dynamic_sample", dynamic_on)
    same_step = augmentation_on and get_key(cfg, "augmentation.when", "same_step") == "same_step"
    if dynamic_on or same_step:  # rollouts of replacements count too: the budget, not max_steps, ends these runs
        rounds = int(get_key(cfg, "model.max_resample_times", 3))
        cfg["trainer"]["max_steps"] = int(cfg["trainer"]["max_steps"]) * (1 + rounds)
    callbacks = cfg["trainer"]["callbacks"]
    callbacks.append({"class_path": SIGNAL_LOGGER})
    callbacks.append({"class_path": BUDGET, "init_args": {"max_completions": budget}})
    max_steps = int(cfg["trainer"]["max_steps"])
    for entry in callbacks:  # one checkpoint, at the end: last.ckpt is then exactly the max_steps policy
        args = entry.get("init_args", {}) if isinstance(entry, dict) else {}
        if "every_n_train_steps" in args:
            args["every_n_train_steps"] = max_steps
    return cfg


def completion_budget(cfg: Mapping[str, Any]) -> int:
    """Completions every arm may sample: max_steps x batch_size x G of the base config (what a
    run without resampling samples; augmented questions replace batch rows, they add none)."""
    steps, iters = int(get_key(cfg, "trainer.max_steps")), int(get_key(cfg, "model.num_iterations", 1) or 1)
    batch, group = int(get_key(cfg, "data.batch_size", 1)), int(get_key(cfg, "model.num_generations", 8))
    return math.ceil(steps / iters) * batch * group


def get_checkpoint_dir(cfg: Mapping[str, Any]) -> str:
    for entry in get_key(cfg, "trainer.callbacks", []) or []:
        dirpath = (entry.get("init_args") or {}).get("dirpath") if isinstance(entry, dict) else None
        if dirpath:
            return str(dirpath)
    raise ValueError("the config has no checkpoint callback with a dirpath; the test needs the run's last.ckpt")


def write_yaml(cfg: dict[str, Any], path: Path) -> Path:
    from omegaconf import OmegaConf

    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(cfg), path)
    return path


def run_name_of(arm: str, seed: int) -> str:
    return f"ablation_{arm}_s{seed}"


def setup_summary(base: Mapping[str, Any], settings: Settings) -> dict[str, Any]:
    """The ablation's settings as the report states them."""
    return {
        "config": str(settings.config),
        "quick": settings.quick,
        "arms": settings.arms,
        "seeds": settings.seeds,
        "max_steps": int(base["trainer"]["max_steps"]),
        "batch_size": int(get_key(base, "data.batch_size", 1)),
        "num_generations": int(get_key(base, "model.num_generations", 1)),
        "num_iterations": int(get_key(base, "model.num_iterations", 1) or 1),
        "max_resample_times": int(get_key(base, "model.max_resample_times", 3)),
        "completions_per_run": completion_budget(base),
        "warm_start_steps": warm_start_sizes(settings)["steps"],
        "extra_args": settings.extra,
        "pacing": settings.pacing,
    }
