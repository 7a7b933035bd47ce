"""A preemption inside an accumulation window (issue 24), in-process on the tiny demo model.

With `trainer.accumulate_grad_batches=2` one optimiser step is two rollouts. SIGTERM as the first
rollout of step 2 starts must finish the window (both rollouts, one optimiser step), save step 2,
exit 143, and `--ckpt_path last` must then end with the weights of the uninterrupted run (whose
`last.ckpt` holds its final step, though max_steps falls between scheduled saves). Dynamic
sampling is on, so the resampled prompts (keyed by step and place in the window) must replay too,
and the two rollouts of a step must draw different fresh prompts; the completion counters must
match as well.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import torch
import yaml

from anatomy_lightning.cli import main
from anatomy_lightning.data.datamodule import AnatomyVQADataModule

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "demo.yaml"
STEPS = 3

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _override(folder: Path, *extra_callbacks: dict) -> Path:
    cfg = {
        "trainer": {
            "max_steps": STEPS, "accumulate_grad_batches": 2, "val_check_interval": 1000, "enable_progress_bar": False,
            "logger": False,
            "callbacks": [
                {"class_path": "anatomy_lightning.checkpointing.ResumableCheckpoint",
                 "init_args": {"dirpath": str(folder / "ckpts"), "filename": "{step}", "save_last": True,
                               "every_n_train_steps": 2, "save_top_k": -1}},
                *extra_callbacks,
            ],
        },
        "curriculum": {"enabled": False},
        "augmentation": {"enabled": False, "encoder": "jaccard"},
        "model": {"num_generations": 2, "max_new_tokens": 6, "dynamic_sample": True, "max_resample_times": 2,
                  "rewards": {"tests.support.cli_runs:half_signal_reward": 1.0}},
        "evaluation": {"sample_every_n_steps": 0},
        "data": {"batch_size": 2, "synthetic": {"n_train": 16, "n_val": 2, "n_test": 2,
                                                "out_dir": str(folder / "synthetic")},
                 "eval_batch_size": 2},
    }
    path = folder / "override.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _fit(folder: Path, override: Path, *flags: str) -> dict[str, torch.Tensor]:
    cli = main(["fit", "--config", str(DEMO), "--config", str(override), *flags])
    assert cli.trainer.global_step == STEPS
    return {n: p.detach().clone() for n, p in cli.model.policy.named_parameters()}


def test_sigterm_inside_an_accumulation_window_resumes_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    draws: list[tuple[str, list[str]]] = []
    original = AnatomyVQADataModule.resample_questions

    def recording(self, n, key):
        questions = original(self, n, key)
        draws.append((key, [q.uid for q in questions]))
        return questions

    monkeypatch.setattr(AnatomyVQADataModule, "resample_questions", recording)

    full, run = tmp_path / "full", tmp_path / "run"
    for folder in (full, run):
        folder.mkdir()
    monkeypatch.chdir(full)
    reference = _fit(full, _override(full))
    # max_steps (3) between scheduled saves (every 2): the final step still reaches last.ckpt, so
    # `test --ckpt_path last` scores the end of the run
    assert sorted(os.listdir(full / "ckpts")) == ["last.ckpt", "step=2.ckpt", "step=3.ckpt"]
    final = torch.load(full / "ckpts" / "last.ckpt", weights_only=True, map_location="cpu")
    assert final["global_step"] == STEPS
    assert all(torch.equal(final["state_dict"][f"policy.{n}"], w) for n, w in reference.items())

    # both rollouts of a step resampled, each from its own key, and they drew different prompts
    firsts = {key.split("/")[0]: uids for key, uids in draws if key.endswith("/1")}
    pairs = [(firsts[s], firsts[f"{s}.1"]) for s in map(str, range(STEPS)) if s in firsts and f"{s}.1" in firsts]
    assert pairs, f"no step resampled in both of its rollouts: {sorted(firsts)}"
    assert all(a != b for a, b in pairs), pairs

    monkeypatch.chdir(run)
    signal_at_step_2 = {"class_path": "tests.support.state_dump.SignalAt", "init_args": {"batch": 2}}
    with pytest.raises(SystemExit) as stopped:
        _fit(run, _override(run, signal_at_step_2))
    assert stopped.value.code == 128 + signal.SIGTERM
    assert "stopped after step 2" in capsys.readouterr().err  # the window of step 2 was finished
    last = torch.load(run / "ckpts" / "last.ckpt", weights_only=True, map_location="cpu")
    assert last["global_step"] == 2

    resumed = _fit(run, _override(run), "--ckpt_path=last")
    assert resumed.keys() == reference.keys()
    moved = [n for n in reference if not torch.equal(reference[n], resumed[n])]
    assert not moved, f"the resumed run's weights differ from the uninterrupted run's: {moved[:5]}"
    # the run-long counters resume too, and the story happened: groups were resampled (more
    # completions than steps x rollouts per step x prompts x G)
    end = torch.load(run / "ckpts" / "last.ckpt", weights_only=True, map_location="cpu")
    counters = ("completions_generated", "completions_total", "num_tokens")
    assert {c: end[c] for c in counters} == {c: final[c] for c in counters}
    assert final["completions_generated"] > STEPS * 2 * 2 * 2
