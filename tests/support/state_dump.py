"""Test-only callback: after every training step, each rank appends its view of the run's state to
`$STATE_DUMP_DIR/rank<r>.jsonl` (batch, group rewards, curriculum, augmentation queue, sampler,
a fingerprint of the weights), so subprocess tests can compare ranks and runs step by step."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


def _full_weights(module: L.LightningModule) -> list[tuple[str, torch.Tensor]]:
    """(name, whole tensor) of every trainable weight, by name. A sharded (FSDP2) weight is gathered
    (`full_tensor`, a collective: every rank calls this at the same point), so a fingerprint says what
    the model is, not what one rank's shard holds."""
    from torch.distributed.tensor import DTensor

    # a copy: `.numpy()` pins a tensor's storage, and FSDP2 frees the storage of gathered weights later
    return [(name, (p.full_tensor() if isinstance(p, DTensor) else p).detach().to("cpu", torch.float32, copy=True))
            for name, p in sorted(module.named_parameters()) if p.requires_grad]


def _fingerprint(weights: list[tuple[str, torch.Tensor]]) -> str:
    h = hashlib.sha1()
    for name, p in weights:
        h.update(name.encode())
        h.update(p.numpy().tobytes())
    return h.hexdigest()[:16]


def _sharded(module: L.LightningModule) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters() if p.requires_grad)


class StateDump(Callback):
    def __init__(self) -> None:
        self.path: Path | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        folder = Path(os.environ.get("STATE_DUMP_DIR", "state_dump"))
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"rank{trainer.global_rank}.jsonl"

    def _callback(self, trainer: L.Trainer, name: str) -> Any:
        return next((cb for cb in trainer.callbacks if type(cb).__name__ == name), None)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        questions = batch if isinstance(batch, list) else batch[0]
        rewards = outputs["group_rewards"]
        curriculum = self._callback(trainer, "CurriculumCallback")
        augmentation = self._callback(trainer, "GroupDiversityCallback")
        dm = trainer.datamodule
        weights = _full_weights(pl_module)
        loss = trainer.callback_metrics.get("train/loss")
        row = {
            "step": trainer.global_step,
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "ids": [q.id for q in questions],
            # with dynamic sampling, the questions the step trained on (groups with signal swapped in)
            "trained_ids": [q.id for q in outputs.get("questions", questions)],
            "completions": int(getattr(pl_module, "completions_total", 0)),
            "group_rewards": rewards.tolist(),
            "group_shape": list(rewards.shape),
            "curriculum": curriculum.state.state_dict() if curriculum is not None else None,
            "augmenter": augmentation.augmenter.state_dict() if augmentation is not None else None,
            "sampler": dm.sampler.state_dict() if dm.sampler is not None else None,
            "weights": _fingerprint(weights),
            "weights_abs_sum": float(sum(p.double().abs().sum() for _, p in weights)),
            "sharded": _sharded(pl_module),
            "loss": None if loss is None else float(loss),
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
            "time": time.time(),
            "torch_rng": hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest()[:16],
        }
        with self.path.open("a") as f:
            f.write(json.dumps(row, default=str) + "\n")


class StepStartDump(Callback):
    """Before every training step, each rank appends the weights, the optimiser state (gathered when
    sharded) and the learning rate to `$STATE_DUMP_DIR/start<r>.jsonl`: what a resumed run must start
    its first step from, compared with the uninterrupted run at the same step."""

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        from torch.distributed.tensor import DTensor

        opt = trainer.optimizers[0]
        h = hashlib.sha1()
        for group in opt.param_groups:
            for p in group["params"]:
                for key, value in sorted(opt.state.get(p, {}).items()):
                    if isinstance(value, torch.Tensor):
                        value = (value.full_tensor() if isinstance(value, DTensor) else value).detach()
                        h.update(key.encode() + value.to("cpu", torch.float64, copy=True).numpy().tobytes())
        weights = _fingerprint(_full_weights(pl_module))
        row = {"step": trainer.global_step, "rank": trainer.global_rank, "weights": weights,
               "optimizer": h.hexdigest()[:16], "lr": opt.param_groups[0]["lr"]}
        folder = Path(os.environ.get("STATE_DUMP_DIR", "state_dump"))
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / f"start{trainer.global_rank}.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")


class NonFiniteLossOnRank(Callback):
    """Fault injection: the GRPO loss of one training step is NaN on one rank only (as when one rank's
    batch hits an overflow), to see whether the ranks stay in step."""

    def __init__(self, rank: int = 1, batch_idx: int = 0) -> None:
        self.rank, self.batch_idx = rank, batch_idx

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        import anatomy_lightning.grpo.update as module_py  # where the step calls grpo_loss

        real = getattr(module_py.grpo_loss, "__wrapped__", module_py.grpo_loss)
        if trainer.global_rank != self.rank or batch_idx != self.batch_idx:
            module_py.grpo_loss = real
            return

        def nan_loss(*args: Any, **kwargs: Any) -> Any:
            out = real(*args, **kwargs)
            out.loss = out.loss * float("nan")
            return out

        nan_loss.__wrapped__ = real  # type: ignore[attr-defined]
        module_py.grpo_loss = nan_loss


class PauseAt(Callback):
    """Holds the run at one point so a test can send it a real signal there: `$PAUSE_AT` is
    "validation:N" (first batch of the validation after step N) or "train:N" (before training
    step N runs). It writes `$PAUSE_DIR/paused` and waits (at most 60 s) until a signal has been
    received; unset, it does nothing."""

    def __init__(self) -> None:
        where, _, step = os.environ.get("PAUSE_AT", "").partition(":")
        self.where, self.step = where, int(step or 0)
        self.done = False

    def _pause(self, trainer: L.Trainer) -> None:
        if self.done:
            return
        self.done = True
        marker = Path(os.environ["PAUSE_DIR"]) / "paused"
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(trainer.global_step))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and getattr(trainer.checkpoint_callback, "_signal", None) is None:
            time.sleep(0.02)

    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self.where == "validation" and not trainer.sanity_checking and trainer.global_step == self.step:
            self._pause(trainer)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.where == "train" and trainer.global_step == self.step - 1:
            self._pause(trainer)


class SignalAt(Callback):
    """Sends this process `signum` (default SIGTERM) as training batch `batch` (0-based, counted over
    the run) starts: a preemption at an exact point of an in-process `fit`."""

    def __init__(self, batch: int, signum: int = 15) -> None:
        self.batch, self.signum = batch, signum

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.fit_loop.epoch_loop.total_batch_idx == self.batch:
            os.kill(os.getpid(), self.signum)
