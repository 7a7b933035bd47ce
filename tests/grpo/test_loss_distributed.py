"""Two gloo ranks, each holding half of a batch's groups, against one process holding all of it.

What DDP does to the gradient is written out: every rank backpropagates its own loss, then the
gradients are averaged over ranks. The `dapo` loss with the global token count must then equal the
single-process token mean over the whole batch, in value and gradient, although the two halves
hold different numbers of tokens; the combined metrics must be the whole batch's token means.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from anatomy_lightning.grpo.loss import global_token_count, grpo_loss, high_entropy_threshold
from anatomy_lightning.grpo.metrics import combine_chunk_metrics

WORLD, B, T = 2, 8, 6


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[0, 2:] = 0  # rank 0 holds rows 0-3 with 3 short rows, rank 1 rows 4-7 with full rows
    mask[1, 1:] = 0
    mask[3, 4:] = 0
    return {
        "logp": -torch.rand(B, T, generator=g, dtype=torch.float64),
        "old": -torch.rand(B, T, generator=g, dtype=torch.float64),
        "ref": -torch.rand(B, T, generator=g, dtype=torch.float64),
        "entropy": torch.rand(B, T, generator=g, dtype=torch.float64),
        "adv": torch.randn(B, generator=g, dtype=torch.float64),
        "mask": mask,
    }


def _loss(x: dict[str, torch.Tensor], rows: slice, logp: torch.Tensor, **kw: object):
    return grpo_loss("dapo", logp, x["adv"][rows], x["mask"][rows], old_logp=x["old"][rows],
                     ref_logp=x["ref"][rows], beta=0.04, entropy=x["entropy"][rows], **kw)


def _rank(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        x = _batch()
        rows = slice(rank * B // WORLD, (rank + 1) * B // WORLD)
        with pytest.raises(ValueError, match="needs num_items_in_batch"):
            _loss(x, rows, x["logp"][rows])
        n = global_token_count(x["mask"][rows])
        shared = x["logp"].clone().requires_grad_()  # stands for a parameter every rank holds
        out = _loss(x, rows, shared[rows], num_items_in_batch=n)
        out.loss.backward()
        grad = shared.grad.clone()
        dist.all_reduce(grad)  # what DDP does: average the gradients over ranks
        grad /= WORLD
        loss = out.loss.detach().clone()
        dist.all_reduce(loss)
        loss /= WORLD
        metrics = combine_chunk_metrics([out])
        threshold = high_entropy_threshold(x["entropy"][rows], x["mask"][rows], 0.3)
        torch.save({"grad": grad, "loss": loss, "n": n, "metrics": metrics, "threshold": threshold},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_dapo_over_two_gloo_ranks_equals_the_single_process_global_token_mean(tmp_path: Path) -> None:
    # fork, not spawn: the children inherit the imported torch instead of importing it again (seconds)
    mp.start_processes(_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True,
                       start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    x = _batch()
    logp = x["logp"].clone().requires_grad_()
    single = _loss(x, slice(0, B), logp)  # one process: dapo is the token mean over the batch
    single.loss.backward()

    assert float(ranks[0]["n"]) == float(x["mask"].sum()) == 37.0  # 13 + 24 live tokens
    for r in ranks:
        torch.testing.assert_close(r["loss"], single.loss.detach(), rtol=1e-12, atol=1e-12)
    for r in ranks:
        torch.testing.assert_close(r["grad"], logp.grad, rtol=1e-12, atol=1e-12)
    # a per-rank token mean (what dapo was) weighs rank 0's 13 tokens like rank 1's 24: different
    half = [_loss(x, slice(r * 4, r * 4 + 4), x["logp"][r * 4: r * 4 + 4]).loss.item() for r in range(WORLD)]
    assert not math.isclose(sum(half) / 2, single.loss.item(), rel_tol=1e-3)

    for key, value in single.metrics.items():
        assert ranks[0]["metrics"][key] == pytest.approx(value, rel=1e-12), key
        assert ranks[1]["metrics"][key] == ranks[0]["metrics"][key]
    expected = torch.quantile(x["entropy"][x["mask"].bool()], 0.7)
    for r in ranks:
        torch.testing.assert_close(r["threshold"].double(), expected, rtol=1e-6, atol=1e-7)
