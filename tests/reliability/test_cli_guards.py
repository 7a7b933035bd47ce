"""What the CLI settles before it builds anything (issue 24): `--ckpt_path auto` for requeue loops,
strategies the module cannot train under refused by name, and every setting with a fixed set of
choices checked up front, all invalid ones named in one error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy

from anatomy_lightning.cli import main
from anatomy_lightning.guards import UNSUPPORTED_STRATEGIES, USE_INSTEAD, check_strategy, resolve_auto_ckpt_path
from anatomy_lightning.settings_check import SettingsError, settings_problems
from tests.support.cli_runs import CONFIGS, cpu_override, run_cli

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "demo.yaml"
MODEL_PARALLEL = "lightning.pytorch.strategies.ModelParallelStrategy"
NO_TENSOR_PARALLEL = ("tensor_parallel_size=auto (GRPOModule has no tensor parallelism: pass "
                      "--trainer.strategy.tensor_parallel_size=1 "
                      "--trainer.strategy.data_parallel_size=<devices x nodes>)")
NO_FOLDERS = ("save_distributed_checkpoint=true (checkpoint folders, which resume, test and export do not read: pass "
              "--trainer.strategy.save_distributed_checkpoint=false, one file written by rank 0)")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _NamedLikeFSDP:  # stands in for Lightning's class: a real Strategy subclass would show in `fit --help`
    pass


_NamedLikeFSDP.__name__ = "FSDPStrategy"


class ShardedSubclass(_NamedLikeFSDP):
    """A user's own FSDP variant: refused like FSDP itself (by the class names of its bases)."""


def _error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """The one `error:` line a CLI call ends in (exit 2)."""
    with pytest.raises(SystemExit) as info:
        main(list(args))
    assert info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture
def no_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in tmp_path; resolving the model path (the first step towards loading it) fails the test."""
    import anatomy_lightning.cli as cli_py

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model path was resolved before the refusal")

    monkeypatch.setattr(cli_py, "resolve_model_path", refuse)
    monkeypatch.chdir(tmp_path)
    return tmp_path


# -- --ckpt_path auto ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_ckpt_path_auto_starts_fresh_then_resumes(tmp_path: Path) -> None:
    """One command for the first start and every restart: fresh without last.ckpt, resumed with it
    (global step continues, TensorBoard keeps the run's folder)."""
    override = cpu_override(tmp_path, model=None, steps=1)
    configs = [CONFIGS / "demo.yaml", override]
    first = run_cli("fit", configs, tmp_path, "--run_name=r", "--ckpt_path=auto")
    assert "--ckpt_path auto: no last.ckpt in checkpoints/r yet; starting a fresh run" in first.stderr
    last = tmp_path / "checkpoints" / "r" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 1
    second = run_cli("fit", configs, tmp_path, "--run_name=r", "--ckpt_path=auto", "--trainer.max_steps=2")
    assert f"--ckpt_path auto: resuming from {Path('checkpoints/r/last.ckpt')}" in second.stderr
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 2
    assert sorted(p.name for p in (tmp_path / "outputs" / "tensorboard" / "r").iterdir()) == ["fit_0"]


def test_ckpt_path_auto_with_a_damaged_last_ckpt_is_refused_as_last_is(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused when fit resolves `last`, before the data is prepared or the policy is loaded."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "checkpoints" / "demo"
    folder.mkdir(parents=True)
    (folder / "last.ckpt").write_bytes(b"not a checkpoint")
    flags = ["fit", "--config", str(DEMO), "--trainer.max_steps=1"]
    auto = _error(capsys, *flags, "--ckpt_path=auto")
    assert auto == _error(capsys, *flags, "--ckpt_path=last")
    assert "last.ckpt is truncated or not a checkpoint" in auto


def test_ckpt_path_auto_needs_a_checkpoint_folder_and_is_for_fit_only(
    no_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (no_model / "no_ckpt.yaml").write_text("trainer:\n  callbacks: []\n")
    err = _error(capsys, "fit", "--config", str(DEMO), "--config", "no_ckpt.yaml", "--ckpt_path=auto")
    assert "--ckpt_path auto needs a checkpoint callback with a dirpath" in err
    err = _error(capsys, "test", "--config", str(DEMO), "--ckpt_path=auto")
    assert "--ckpt_path auto is for fit" in err


def test_resolve_auto_ckpt_path_takes_what_last_takes(tmp_path: Path) -> None:
    callbacks = [{"class_path": "anatomy_lightning.checkpointing.ResumableCheckpoint",
                  "init_args": {"dirpath": str(tmp_path / "ckpts")}}]
    config = {"ckpt_path": "auto", "trainer": {"callbacks": callbacks}}
    assert resolve_auto_ckpt_path("fit", config) is None  # the folder does not exist yet
    (tmp_path / "ckpts").mkdir()
    (tmp_path / "ckpts" / "step=2.ckpt").write_bytes(b"")
    (tmp_path / "ckpts" / ".last.ckpt.123-abc.tmp").write_bytes(b"")  # a save killed before its rename
    assert resolve_auto_ckpt_path("fit", config) is None
    (tmp_path / "ckpts" / "last-v1.ckpt").write_bytes(b"")  # an older Lightning's name: `last` takes it too
    assert resolve_auto_ckpt_path("fit", config) == "last"
    for given in (None, "last", "some/file.ckpt"):
        assert resolve_auto_ckpt_path("test", {**config, "ckpt_path": given}) == given


# -- strategies ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "named", "refused"),
    [
        ("fsdp", "fsdp (FSDPStrategy)", "FSDPStrategy"),
        ("deepspeed_stage_2", "deepspeed_stage_2 (DeepSpeedStrategy)", "DeepSpeedStrategy"),
    ],
)
def test_unsupported_strategies_are_refused_by_name_before_anything_is_built(
    flag: str, named: str, refused: str, no_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _error(capsys, "fit", "--config", str(DEMO), f"--trainer.strategy={flag}")
    assert err == f"error: trainer.strategy={named} is not supported: {UNSUPPORTED_STRATEGIES[refused]}; {USE_INSTEAD}"
    assert "ModelParallelStrategy" in err  # the one that shards
    assert not (no_model / "outputs").exists()  # no data written, no run folder


@pytest.mark.parametrize(
    ("given", "named", "problems"),
    [
        ([f"--trainer.strategy={MODEL_PARALLEL}"], MODEL_PARALLEL, [NO_TENSOR_PARALLEL, NO_FOLDERS]),
        (["--trainer.strategy=ModelParallelStrategy"], "ModelParallelStrategy", [NO_TENSOR_PARALLEL, NO_FOLDERS]),
        ([f"--trainer.strategy={MODEL_PARALLEL}", "--trainer.strategy.tensor_parallel_size=1",
          "--trainer.strategy.data_parallel_size=2"], MODEL_PARALLEL, [NO_FOLDERS]),
        ([f"--trainer.strategy={MODEL_PARALLEL}", "--trainer.strategy.tensor_parallel_size=2",
          "--trainer.strategy.save_distributed_checkpoint=false"], MODEL_PARALLEL,
         [NO_TENSOR_PARALLEL.replace("=auto", "=2")]),
        ("yaml", MODEL_PARALLEL, [NO_FOLDERS]),
    ],
)
def test_model_parallel_is_refused_with_the_flags_that_fix_it_before_anything_is_built(
    given: list[str] | str, named: str, problems: list[str], no_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Lightning's defaults split tensors over the GPUs of a node and write checkpoint folders; the module
    shards with FSDP2 over data-parallel ranks only and writes checkpoint files."""
    if given == "yaml":
        (no_model / "mp.yaml").write_text(
            f"trainer:\n  strategy:\n    class_path: {MODEL_PARALLEL}\n"
            "    init_args: {data_parallel_size: 2, tensor_parallel_size: 1}\n"
        )
        given = ["--config", "mp.yaml"]
    err = _error(capsys, "fit", "--config", str(DEMO), *given)
    assert err == f"error: trainer.strategy={named}: " + "; ".join(problems)
    assert not (no_model / "outputs").exists()


def test_model_parallel_refuses_what_fsdp2_cannot_shard(no_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _error(capsys, "fit", "--config", str(DEMO), f"--trainer.strategy={MODEL_PARALLEL}",
                 "--trainer.strategy.tensor_parallel_size=1", "--trainer.strategy.data_parallel_size=2",
                 "--trainer.strategy.save_distributed_checkpoint=false", "--model.optimizer=adamw_8bit")
    assert err == ("error: under ModelParallelStrategy (FSDP2): model.optimizer=adamw_8bit (bitsandbytes' 8-bit "
                   "optimisers do not take sharded weights): use adamw, whose state is sharded already (1/N per rank)")
    assert not (no_model / "outputs").exists()


def test_strategy_check_knows_aliases_subclasses_and_instances() -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    for fine in (None, "auto", "ddp", "ddp_spawn", "lightning.pytorch.strategies.DDPStrategy", "no.such.Strategy",
                 ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=False),
                 {"class_path": MODEL_PARALLEL, "init_args": {"data_parallel_size": 4, "tensor_parallel_size": 1,
                                                              "save_distributed_checkpoint": False}}):
        check_strategy(fine)
    with pytest.raises(ValueError, match=r"trainer.strategy=ModelParallelStrategy: save_distributed_checkpoint=true"):
        check_strategy(ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))
    with pytest.raises(ValueError, match=r"test_cli_guards.ShardedSubclass \(FSDPStrategy\) is not supported"):
        check_strategy("tests.reliability.test_cli_guards.ShardedSubclass")
    with pytest.raises(ValueError, match=r"trainer.strategy=FSDPStrategy is not supported"):
        check_strategy(FSDPStrategy())


def test_the_module_refuses_an_unsupported_strategy_from_python_before_loading_the_policy() -> None:
    from types import SimpleNamespace

    from anatomy_lightning.module import GRPOModule

    module = GRPOModule(num_generations=2)
    module._trainer = SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(ValueError, match=r"is not supported: it wraps the model in FSDP1"):
        module.configure_model()
    assert module.policy is None


# -- settings with a fixed set of choices ------------------------------------------------------------


def test_every_invalid_choice_is_named_in_one_error_before_the_model_loads(
    no_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = {
        "model.loss_type": "dapo2", "model.scale_rewards": "std", "model.importance_sampling_level": "seq",
        "model.lr_schedule": "step", "model.optimizer": "sgd", "model.quantization": "3bit",
        "model.dtype": "float8", "data.similarity.aggregation": "median", "data.similarity.stages": "local",
        "data.synthetic.benchmark": "v9", "data.prompt": "raw", "data.on_bad_record": "ignore",
        "curriculum.mode": "mixed", "curriculum.pacing": "validation", "augmentation.when": "later",
    }
    err = _error(capsys, "fit", "--config", str(DEMO), *(f"--{k}={v}" for k, v in bad.items()))
    assert err.startswith(f"error: {len(bad)} setting(s)")
    for key, value in bad.items():
        assert f"{key} = {value!r}: must be one of [" in err, key
    from anatomy_lightning.grpo.loss import LOSS_AGGREGATIONS

    assert f"model.loss_type = 'dapo2': must be one of {list(LOSS_AGGREGATIONS)}" in err
    assert {"grpo", "dapo", "cispo", "sapo", "luspo", "vespo"} <= set(LOSS_AGGREGATIONS)
    assert not (no_model / "outputs").exists()


def test_every_valid_choice_and_the_accepted_spellings_pass() -> None:
    from anatomy_lightning.callbacks.curriculum import MODES, PACINGS
    from anatomy_lightning.grpo.advantages import SCALE_REWARDS
    from anatomy_lightning.grpo.loss import IMPORTANCE_SAMPLING_LEVELS, LOSS_AGGREGATIONS
    from anatomy_lightning.models.loading import DTYPES, OPTIMIZERS, QUANTIZATIONS
    from anatomy_lightning.optimization import LR_SCHEDULES

    model_choices = {"loss_type": LOSS_AGGREGATIONS, "scale_rewards": (*SCALE_REWARDS, True, False),
                     "importance_sampling_level": IMPORTANCE_SAMPLING_LEVELS, "lr_schedule": LR_SCHEDULES,
                     "optimizer": OPTIMIZERS, "quantization": (*QUANTIZATIONS, None), "dtype": DTYPES}
    for key, choices in model_choices.items():
        for value in choices:
            assert settings_problems(model={key: value}) == [], (key, value)
    for mode in MODES:
        for pacing in PACINGS:
            assert settings_problems(curriculum={"mode": mode, "pacing": pacing}) == []
    data = {"similarity": {"aggregation": "mean", "stages": "global"}, "test_split": None,
            "synthetic": {"kinds": ["position", "tool"], "benchmark": "v3"}}
    assert settings_problems(data=data) == []
    assert settings_problems(model={"scale_rewards": 1}) == [
        "model.scale_rewards = 1: must be one of ['group', 'batch', 'none', True, False] (true = group, false = none)"
    ]


def test_the_module_names_every_invalid_choice_from_python_too() -> None:
    from anatomy_lightning.module import GRPOModule

    with pytest.raises(SettingsError) as info:
        GRPOModule(loss_type="dapo2", importance_sampling_level="seq", scale_rewards="std")
    for key in ("model.loss_type", "model.importance_sampling_level", "model.scale_rewards"):
        assert key in str(info.value)
