"""Lightning's own knobs through the CLI, as a user sets them (issue 13): accumulation, clipping, the
learning-rate schedule (ours, and any torch scheduler / optimizer via --lr_scheduler / --optimizer),
dtype vs precision, the curriculum and augmentation sections, predict, the progress lines, the TRL
tags and a resumed run's TensorBoard folder."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from anatomy_lightning.cli import main

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *flags: str):
    """Parse the demo config plus `flags` and build model, data and trainer (no subcommand, no run)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    return main(["--config", str(DEMO), *flags], run=False)


def _exit_message(capsys: pytest.CaptureFixture[str], *flags: str) -> str:
    """The one-line error (exit 2) a `fit` with `flags` ends in, before any data or model work."""
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(DEMO), *flags])
    assert info.value.code == 2
    return capsys.readouterr().err


def _lr_trace(cli, steps: int) -> list[float]:
    """The learning rate of optimiser steps 0..steps-1, from the module's configure_optimizers."""
    model = cli.model
    model.policy = torch.nn.Linear(2, 2)  # configure_optimizers needs trainable parameters only
    model.trainer = cli.trainer
    conf = model.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    trace = []
    for _ in range(steps):
        trace.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return trace


# -- learning-rate schedule --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        # warmup 2: (s+1)/3 for s = 0, 1; then decay over the 8 remaining of max_steps=10
        ("linear", [1 / 3, 2 / 3, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]),
        ("cosine", [1 / 3, 2 / 3] + [0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]),
        ("constant", [1 / 3, 2 / 3] + [1.0] * 8),
    ],
)
def test_lr_schedule_traces(schedule: str, expected: list[float], tmp_path: Path,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    cli = _build(tmp_path, monkeypatch, f"--model.lr_schedule={schedule}", "--model.warmup_steps=2",
                 "--trainer.max_steps=10", "--model.learning_rate=0.1")
    assert _lr_trace(cli, 10) == pytest.approx([0.1 * f for f in expected])


def test_decaying_schedule_without_max_steps_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cli = _build(tmp_path, monkeypatch, "--model.lr_schedule=cosine", "--trainer.max_steps=-1")
    with pytest.raises(ValueError, match="set trainer.max_steps"):
        _lr_trace(cli, 1)


def test_cli_lr_scheduler_and_optimizer_replace_the_model_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    cli = _build(tmp_path, monkeypatch, "--optimizer=torch.optim.SGD", "--optimizer.lr=0.2",
                 "--lr_scheduler=torch.optim.lr_scheduler.CosineAnnealingLR", "--lr_scheduler.T_max=4")
    with caplog.at_level("INFO", logger="anatomy_lightning"):
        trace = _lr_trace(cli, 5)
    assert trace == pytest.approx([0.2 * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(5)])
    assert isinstance(cli.model.configure_optimizers()["optimizer"], torch.optim.SGD)
    said = caplog.text
    assert "from --optimizer" in said and "model.learning_rate" in said and "from --lr_scheduler" in said


def test_cli_lr_scheduler_alone_steps_the_model_optimizer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning ignores --lr_scheduler without --optimizer; here it schedules model.optimizer."""
    cli = _build(tmp_path, monkeypatch, "--lr_scheduler=StepLR", "--lr_scheduler.step_size=2",
                 "--lr_scheduler.gamma=0.5", "--model.learning_rate=0.4")
    assert _lr_trace(cli, 5) == pytest.approx([0.4, 0.4, 0.2, 0.2, 0.1])
    assert isinstance(cli.model.configure_optimizers()["optimizer"], torch.optim.AdamW)


# -- gradient settings, dtype / precision ------------------------------------------------------------


def test_trainer_gradient_settings_reach_the_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cli = _build(tmp_path, monkeypatch, "--trainer.accumulate_grad_batches=3", "--trainer.gradient_clip_val=0.5",
                 "--trainer.gradient_clip_algorithm=value")
    m = cli.model
    assert (m.accumulate_grad_batches, m.gradient_clip_val, m.gradient_clip_algorithm) == (3, 0.5, "value")
    # the Trainer itself keeps the defaults: Lightning would refuse them under manual optimisation
    assert cli.trainer.accumulate_grad_batches == 1 and not cli.trainer.gradient_clip_val
    default = _build(tmp_path, monkeypatch)
    assert default.model.gradient_clip_val == 1.0  # the default clipping (TRL's max_grad_norm)


def test_clipping_by_norm_and_value() -> None:
    from anatomy_lightning.module import GRPOModule
    from anatomy_lightning.optimization import clip_gradients

    m = GRPOModule()
    assert m.gradient_clip_val == 1.0  # the same default as the CLI's trainer.gradient_clip_val
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=1.0)
    for algorithm, clipped in (("norm", [0.3, 0.4]), ("value", [0.5, 0.5])):
        m.use_trainer_gradient_settings(1, 0.5, algorithm)
        p.grad = torch.tensor([3.0, 4.0])
        assert clip_gradients(opt, m.gradient_clip_val, m.gradient_clip_algorithm) == pytest.approx(5.0)  # the norm before clipping is what is logged
        assert p.grad.tolist() == pytest.approx(clipped)


def test_accumulation_with_several_iterations_is_refused() -> None:
    from anatomy_lightning.module import GRPOModule

    with pytest.raises(ValueError, match="num_iterations"):
        GRPOModule(num_iterations=2).use_trainer_gradient_settings(accumulate_grad_batches=2)


def test_dtype_and_precision_cannot_disagree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    err = _exit_message(capsys, "--model.dtype=bfloat16", "--trainer.precision=32-true")
    assert "model.dtype=bfloat16 but trainer.precision=32-true" in err
    cli = _build(tmp_path, monkeypatch, "--model.dtype=bfloat16", "--trainer.precision=null")
    assert cli.trainer.precision == "bf16-true"  # an unset precision follows model.dtype
    cli = _build(tmp_path, monkeypatch, "--model.dtype=auto")
    cli.model.trainer = cli.trainer
    assert cli.model._weight_dtype() == "float32"  # auto follows the demo's 32-true


# -- config sections and help ------------------------------------------------------------------------


def _print_config(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    with pytest.raises(SystemExit) as info:
        main(["fit", *args, "--print_config"])
    assert info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_curriculum_and_augmentation_are_sections(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _print_config(capsys, "--config", str(DEMO), "--curriculum.promote_at=0.7", "--augmentation.max_fraction=0.3")
    assert cfg["curriculum"]["promote_at"] == 0.7 and cfg["curriculum"]["patience"] == 2  # the rest from the YAML
    assert cfg["augmentation"]["max_fraction"] == 0.3
    # a data config layered on a model config keeps the model config's sections
    qlora = REPO / "configs" / "qwen2_5_vl_3b_qlora.yaml"
    cfg = _print_config(capsys, "--config", str(qlora), "--config", str(REPO / "configs" / "sgg_vqa.yaml"))
    assert cfg["curriculum"]["max_steps_per_stage"] == 800 and cfg["augmentation"]["enabled"] is True


def test_callbacks_list_entry_for_a_section_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "anatomy_lightning.callbacks.curriculum.CurriculumCallback",
         "init_args": {"promote_at": 0.5}}]}}))
    err = _exit_message(capsys, "--config", str(old))
    assert "top-level `curriculum:` section" in err


def test_help_documents_sections_data_options_and_the_reward_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = capsys.readouterr().out
    assert "--curriculum.promote_at" in text and "--augmentation.max_fraction" in text
    assert "default: {'accuracy': 1.0, 'format': 0.5}" in " ".join(text.split())
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("  --data.") and " " in line.strip():
            assert not lines[i + 1].strip().startswith("(type:"), f"{line.strip()} has no help line"


# -- entropy from the rollout forwards ----------------------------------------------------------------


def test_rollout_logprobs_with_entropy() -> None:
    from anatomy_lightning.data.synthetic import SceneGenerator
    from anatomy_lightning.grpo import prompts as P
    from anatomy_lightning.grpo import rollout as R
    from anatomy_lightning.grpo import sequences as S
    from anatomy_lightning.models.tiny import build_tiny_model

    model, processor = build_tiny_model("tiny", seed=0)
    model.eval()
    gen = SceneGenerator(seed=0, image_size=56)
    images, questions = {}, []
    for scene, qs in gen.draw(2, with_images=True):
        images[qs[0].images[0]] = gen.render(scene)
        questions.append(qs[0])
    torch.manual_seed(0)
    ro = R.generate(model, processor, P.encode_prompts(questions, processor, images.__getitem__), 2, 5)
    with torch.no_grad():
        plain = R.rollout_logprobs(model, ro, ro.completion_ids)
        logp, ent = R.rollout_logprobs(model, ro, ro.completion_ids, with_entropy=True)
        tok = processor.tokenizer
        image_id = tok.convert_tokens_to_ids("<|image_pad|>")
        seq = S.sequence_inputs(ro, image_id, tok.pad_token_id, [image_id])
        C = ro.completion_ids.shape[1]
        logits = model(**seq.rows(0, len(ro.texts)), use_cache=False, logits_to_keep=C + 1).logits[:, :-1]
    assert torch.equal(logp, plain)
    expected = torch.distributions.Categorical(logits=logits.float()).entropy()
    assert torch.allclose(ent, expected, atol=1e-4)


# -- real runs ----------------------------------------------------------------------------------------

TINY = {
    "trainer": {"max_steps": 1, "val_check_interval": 100, "enable_model_summary": False, "logger": False,
                "callbacks": [], "enable_checkpointing": False, "gradient_clip_val": None},
    "curriculum": {"enabled": False},
    "augmentation": {"enabled": False, "encoder": "jaccard"},
    "model": {"num_generations": 2, "max_new_tokens": 6, "min_new_tokens": 6, "beta": 0.0,
              "rewards": {"tests.support.cli_runs:length_reward": 1.0}},
    "evaluation": {"sample_every_n_steps": 0},
    "data": {"synthetic": {"n_train": 8, "n_val": 2, "n_test": 2}, "eval_batch_size": 2},
}


def _rank_in_group_pick(logits, do_sample, temperature=1.0, top_p=1.0, top_k=0, generator=None):
    """Row b takes its (b mod G)-th most likely token: completions that differ inside a group and do not
    depend on which other rows share the batch (sampling draws would)."""
    order = logits.argsort(dim=-1, descending=True)
    rows = torch.arange(logits.shape[0])
    return order[rows, rows % 2]


def _tiny_fit_setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, torch.Tensor], Path]:
    """Deterministic completions, the policy's weights recorded at fit start, the TINY override file."""
    from anatomy_lightning.grpo import fast_path as F
    from anatomy_lightning.module import GRPOModule

    monkeypatch.setattr(F, "pick_next_token", _rank_in_group_pick)
    start: dict[str, torch.Tensor] = {}
    monkeypatch.setattr(GRPOModule, "on_fit_start", lambda self: start.update(
        {n: p.detach().clone() for n, p in self.policy.named_parameters()}))
    override = tmp_path / "tiny.yaml"
    override.write_text(yaml.safe_dump(TINY))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    return start, override


@pytest.mark.slow
def test_accumulation_equals_one_batch_twice_the_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two rollouts of 2 prompts accumulated into one SGD step == one step on a rollout of 4 prompts."""
    start, override = _tiny_fit_setup(tmp_path, monkeypatch)
    deltas = []
    # the accumulated run also trains in row chunks of one group (logprob_batch_size=2)
    for flags in (["--data.batch_size=4"],
                  ["--data.batch_size=2", "--trainer.accumulate_grad_batches=2", "--model.logprob_batch_size=2"]):
        cli = main(["fit", "--config", str(DEMO), "--config", str(override), "--optimizer=torch.optim.SGD",
                    "--optimizer.lr=1.0", *flags])
        assert cli.trainer.global_step == 1
        deltas.append({n: p.detach() - start[n] for n, p in cli.model.policy.named_parameters()})
    moved = [n for n, d in deltas[0].items() if d.abs().max() > 1e-6]
    assert moved, "the step should move the parameters"
    for n in deltas[0]:
        torch.testing.assert_close(deltas[1][n], deltas[0][n], atol=2e-6, rtol=1e-4)


@pytest.mark.slow
def test_new_loss_knobs_through_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """dapo + GSPO + entropy masking + importance-weighted KL + batch-scaled rewards, set as a user sets
    them, in row chunks of one group: the step runs, moves the policy and logs finite TRL metrics."""
    start, override = _tiny_fit_setup(tmp_path, monkeypatch)
    cli = main(["fit", "--config", str(DEMO), "--config", str(override), "--model.loss_type=dapo",
                "--model.importance_sampling_level=sequence", "--model.top_entropy_quantile=0.5",
                "--model.use_bias_correction_kl=true", "--model.scale_rewards=batch", "--model.beta=0.04",
                "--model.min_new_tokens=0", "--model.logprob_batch_size=2", "--data.batch_size=2"])
    hp = cli.model.hparams
    assert (hp.loss_type, hp.importance_sampling_level, hp.top_entropy_quantile, hp.use_bias_correction_kl,
            hp.scale_rewards) == ("dapo", "sequence", 0.5, True, "batch")
    assert any((p.detach() - start[n]).abs().max() > 0 for n, p in cli.model.policy.named_parameters())
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("train/")}
    for tag in ("train/entropy", "train/kl", "train/loss", "train/clip_ratio/region_mean", "train/num_tokens"):
        assert math.isfinite(metrics[tag]), tag
    assert metrics["train/entropy"] > 0


NEWER_LOSS_FLAGS = {  # TRL 1.16's newer loss types, each with its own knobs set as a user sets them
    "cispo": ["--model.epsilon_high=5.0"],  # eps_max (the demo's 0.28 is refused for cispo)
    "luspo": ["--model.importance_sampling_level=sequence", "--model.delta=1.5"],
    "sapo": ["--model.sapo_temperature_pos=0.9", "--model.sapo_temperature_neg=1.1"],
    "vespo": ["--model.vespo_k_pos=1.5", "--model.vespo_lambda_neg=2.5"],
}


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", sorted(NEWER_LOSS_FLAGS))
def test_newer_loss_types_through_the_cli(loss_type: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """cispo / luspo (+ delta) / sapo / vespo from the command line: the settings arrive, one step
    moves the policy and logs a finite loss."""
    start, override = _tiny_fit_setup(tmp_path, monkeypatch)
    flags = NEWER_LOSS_FLAGS[loss_type]
    cli = main(["fit", "--config", str(DEMO), "--config", str(override), f"--model.loss_type={loss_type}", *flags,
                "--data.batch_size=2"])
    hp = cli.model.hparams
    assert hp.loss_type == loss_type
    for flag in flags:
        key, value = flag.removeprefix("--model.").split("=")
        assert str(hp[key]) == value, key
    assert any((p.detach() - start[n]).abs().max() > 0 for n, p in cli.model.policy.named_parameters())
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("train/")}
    assert math.isfinite(metrics["train/loss"])


def test_bad_newer_loss_settings_fail_up_front_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    err = _exit_message(capsys, "--model.loss_type=sapo", "--model.sapo_temperature_neg=0")
    assert len(err.strip().splitlines()) == 1
    assert "model.sapo_temperature_neg = 0.0: must be > 0" in err
    err = _exit_message(capsys, "--model.loss_type=cispo", "--model.delta=1.1")  # demo: epsilon_high 0.28
    assert len(err.strip().splitlines()) == 1
    assert "model.epsilon_high = 0.28: must be >= 1 with model.loss_type = 'cispo'" in err
    assert "model.delta = 1.1: must be > 1 + model.epsilon_high (1.28)" in err
    assert "model.delta = 1.1: acts only on loss_type grpo, bnpo, dapo, dr_grpo, luspo" in err


@pytest.mark.slow
def test_estimator_aggregation_soft_overlong_and_ref_sync_through_the_cli(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """rloo + GDPO's normalize_then_sum + the soft_overlong reward + a reference synced after every step, in full
    fine-tuning, set as a user sets them: the settings arrive, the policy moves and the reference becomes
    0.6 * policy + 0.4 * reference (TRL's mixup), where the policy trains."""
    start, override = _tiny_fit_setup(tmp_path, monkeypatch)
    rewards = tmp_path / "rewards.yaml"
    rewards.write_text(yaml.safe_dump({"model": {"rewards": {"tests.support.cli_runs:length_reward": 1.0,
                                                             "soft_overlong": 0.5}}}))
    cli = main(["fit", "--config", str(DEMO), "--config", str(override), "--config", str(rewards),
                "--model.advantage_estimator=rloo", "--model.multi_objective_aggregation=normalize_then_sum",
                "--model.scale_rewards=null", "--model.soft_cache_length=4", "--model.min_new_tokens=0",
                "--model.beta=0.04", "--model.sync_ref_model=true", "--model.ref_model_sync_steps=1",
                "--data.batch_size=2"])
    model, hp = cli.model, cli.model.hparams
    assert (hp.advantage_estimator, hp.multi_objective_aggregation, hp.soft_cache_length, hp.soft_max_length,
            hp.sync_ref_model, hp.ref_model_mixup_alpha, hp.ref_model_sync_steps) == (
        "rloo", "normalize_then_sum", 4, None, True, 0.6, 1)
    assert hp.scale_rewards == "none"  # null (the demo says group): rloo's own; normalize_then_sum ignores it
    assert "soft_overlong" in model.reward_computer.funcs and cli.trainer.global_step == 1
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("train/")}
    assert -1.0 <= metrics["train/rewards/soft_overlong/mean"] <= 0.0
    moved = 0
    for (n, p), (rn, r) in zip(model.policy.named_parameters(), model.reference.named_parameters()):
        assert n == rn
        if p.requires_grad:
            torch.testing.assert_close(r, 0.6 * p.detach() + 0.4 * start[n])
            moved += int(not torch.equal(r, start[n]))
        else:
            assert torch.equal(r, start[n]), n
    assert moved > 0


def test_bad_advantage_and_reference_settings_fail_up_front_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    err = _exit_message(capsys, "--model.advantage_estimator=ppo", "--model.multi_objective_aggregation=gdpo")
    assert len(err.strip().splitlines()) == 1
    assert "model.advantage_estimator = 'ppo': must be one of ['grpo', 'rloo', 'reinforce_plus_plus']" in err
    assert ("model.multi_objective_aggregation = 'gdpo': must be one of ['sum_then_normalize', "
            "'normalize_then_sum']") in err
    err = _exit_message(capsys, "--model.sync_ref_model=true", "--model.beta=0", "--model.ref_model_mixup_alpha=1.5",
                        '--model.rewards={"accuracy": 1.0, "soft_overlong": 1.0}')
    assert len(err.strip().splitlines()) == 1
    assert "model.sync_ref_model = True: needs model.beta > 0" in err
    assert "model.ref_model_mixup_alpha = 1.5: must be in [0, 1]" in err
    assert "model.soft_cache_length = None: must be set when model.rewards has soft_overlong" in err
    err = _exit_message(capsys, "--model.sync_ref_model=true", '--model.lora={"r": 4}')
    assert "model.sync_ref_model = True: full fine-tuning only" in err


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "anatomy_lightning", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_non_tty_fit_resume_and_predict(tmp_path: Path) -> None:
    """Without a terminal: plain progress lines, TRL's tags, no library noise; `--ckpt_path last`
    continues the same TensorBoard folder with continuous steps; `predict` writes a row per question."""
    from tests.test_cli import _scalars

    override = tmp_path / "small.yaml"
    override.write_text(yaml.safe_dump({
        "trainer": {"max_steps": 2, "val_check_interval": 2, "log_every_n_steps": 1, "enable_model_summary": False},
        "model": {"num_generations": 2, "max_new_tokens": 6,
                  "rewards": {"tests.support.cli_runs:length_reward": 1.0, "accuracy": 1.0}},
        "evaluation": {"sample_every_n_steps": 0},
        "data": {"synthetic": {"n_train": 16, "n_val": 4, "n_test": 4}, "batch_size": 2, "eval_batch_size": 4},
        "augmentation": {"encoder": "jaccard"},
    }))
    common = ["--config", str(DEMO), "--config", str(override), "--run_name=knobs"]
    fit = _run(["fit", *common], tmp_path)
    out = fit.stdout + fit.stderr
    lines = [ln for ln in out.splitlines() if ln.startswith("step ")]
    assert [ln.split(" | ")[0] for ln in lines] == ["step 1/2", "step 2/2"], out[-3000:]
    assert all(k in lines[-1] for k in ("reward ", "accuracy ", "kl ", "s/step", "ETA ")), lines
    for noise in ("Tip:", "LeafSpec", "args parameter", "gemm_4bit_forward", "Epoch 0/"):
        assert noise not in out, noise
    resumed = _run(["fit", *common, "--ckpt_path=last", "--trainer.max_steps=3"], tmp_path)
    assert "step 3/3" in resumed.stderr and "step 1/3" not in resumed.stderr
    [version] = (tmp_path / "outputs" / "tensorboard" / "knobs").iterdir()  # one run folder, not two
    scalars = _scalars(version)
    # steps 0 and 1 by the first run, 2 after the resume, in the same folder
    assert [s for s, _ in scalars["train/reward"]] == [0, 1, 2]
    for tag in ("entropy", "kl", "rewards/accuracy/mean", "rewards/accuracy/std", "completions/mean_terminated_length",
                "clip_ratio/low_min", "clip_ratio/high_max", "num_tokens", "frac_reward_zero_std", "grad_norm"):
        assert f"train/{tag}" in scalars, tag
    tokens = [v for _, v in scalars["train/num_tokens"]]
    assert tokens == sorted(tokens) and tokens[0] > 0  # a running total, carried over the resume
    preds = tmp_path / "preds.jsonl"
    ckpt = tmp_path / "checkpoints" / "knobs" / "last.ckpt"
    _run(["predict", *common, f"--ckpt_path={ckpt}", f"--evaluation.predictions_file={preds}"], tmp_path)
    rows = preds.read_text().splitlines()
    assert len(rows) == 4 and '"prediction"' in rows[0]


def test_progress_line_names_step_reward_accuracy_kl_speed_and_eta(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from anatomy_lightning.callbacks import progress

    trainer = SimpleNamespace(global_step=20, max_steps=400, callback_metrics={
        "train/reward": torch.tensor(0.4123), "train/rewards/accuracy/mean": torch.tensor(0.375),
        "val/acc": torch.tensor(0.35), "train/kl": torch.tensor(0.01234)})
    cb = progress.ProgressLog()
    cb._t0, cb._step0 = 0.0, 0
    monkeypatch.setattr(progress.time, "perf_counter", lambda: 46.2)  # 2.31 s per step so far
    assert cb.line(trainer) == (
        "step 20/400 | reward 0.412 | accuracy 0.375 | val/acc 0.350 | kl 0.0123 | 2.31 s/step | ETA 14m 37s")
