"""Sharded training (FSDP2 under Lightning's ModelParallelStrategy, `anatomy_lightning.sharding`).

In process, two gloo ranks: a policy sharded over both ranks rolls out, scores its reference and
takes an optimiser step exactly as the whole model does in one process (both ranks hold the same
batch, so FSDP2's averaged gradient is the one-process gradient): full fine-tuning with its frozen
reference copy sharded too (and TR-DPO's reference sync on the shards), LoRA with the adapter-off
reference (and the adapter written by rank 0 from the gathered weights), QLoRA (4-bit weights
sharded), and a generic-path family (Hugging Face `generate`).

Through the CLI (slow): `fit` on two CPU ranks with ModelParallelStrategy keeps DTensor weights that
are the same gathered on both ranks after every step, writes one checkpoint file that resumes with
the weights, optimiser state and learning rate it was written with, that `test` (sharded) and
`export` read; and it logs, rank by rank, the losses the same run logs under DDP.
"""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.support.reliability_runs import DEMO, check, fit_command, read_dump, run_env, write_override

WORLD, G, NEW_TOKENS = 2, 2, 5
MODEL_PARALLEL = (
    "--trainer.accelerator=cpu", "--trainer.devices=2",
    "--trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy",
    "--trainer.strategy.data_parallel_size=2", "--trainer.strategy.tensor_parallel_size=1",
    "--trainer.strategy.save_distributed_checkpoint=false",
)
DDP = ("--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp")
# a reward with spread in every group whatever the random policy writes, so every step has a gradient
SPREAD = '--model.rewards={"tests.support.tiny_vqa:length_reward": 1.0}'

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- in process: the sharded step against the whole model ------------------------------------------


def _models(kind: str):
    """(policy, frozen reference copy or None, processor, family)."""
    from anatomy_lightning.models.families import family_of
    from anatomy_lightning.models.loading import frozen_copy
    from anatomy_lightning.models.tiny import build_tiny_model
    from tests.grpo.test_rollout_fast import _lora

    if kind == "generic":
        from tests.support.standins import build_standin_model

        model, processor = build_standin_model("gemma3", seed=0)
    elif kind == "qlora":  # FSDP-QLoRA: nf4 weights stored in the weights' dtype (`sharding.quant_storage`)
        from anatomy_lightning.models.loading import LoraSettings, load_policy
        from anatomy_lightning.sharding import quant_storage

        torch.manual_seed(0)
        model, processor = load_policy("tiny-qwen2.5-vl", dtype="float32", quantization="4bit",
                                       lora=LoraSettings(dropout=0.0), quant_storage=quant_storage("float32"))
        with torch.no_grad():  # a non-identity adapter, so adapter on and off differ
            gen = torch.Generator().manual_seed(1)
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        return model, None, processor, family_of(model)
    else:
        model, processor = build_tiny_model("tiny", seed=0)
    if kind == "lora":
        model = _lora(model)
    processor.tokenizer.padding_side = "left"
    return model, None if kind == "lora" else frozen_copy(model), processor, family_of(model)


def _step(model, reference, processor, questions, images, family) -> dict:
    """One GRPO step as the module takes it: rollout (the family's path), reference log-probs, loss
    with the KL term, clipped AdamW step."""
    from anatomy_lightning.grpo import prompts as P
    from anatomy_lightning.grpo import rollout as R
    from anatomy_lightning.grpo.loss import grpo_loss
    from anatomy_lightning.models.loading import reference_model
    from anatomy_lightning.optimization import clip_gradients
    from anatomy_lightning.sharding import full_tensor

    encode = lambda qs: P.encode_prompts(qs, processor, images.__getitem__, family=family)  # noqa: E731
    torch.manual_seed(3)
    ro = R.Rollouts(model, processor, family, encode).sample(questions, G, NEW_TOKENS, do_sample=True)
    with torch.no_grad(), reference_model(model, reference) as ref:
        ref_logp = R.rollout_logprobs(ref, ro, ro.completion_ids, reuse_images=False)
    model.train()
    logp = R.rollout_logprobs(model, ro, ro.completion_ids, reuse_images=False)
    adv = torch.linspace(-1.0, 1.0, logp.shape[0])
    loss = grpo_loss("grpo", logp, adv, ro.completion_mask, ref_logp=ref_logp, beta=0.04, group_size=G).loss
    loss.backward()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    norm = clip_gradients(opt, 1.0, "norm")
    opt.step()
    model.eval()
    weights = {n: full_tensor(p.detach()).clone() for n, p in model.named_parameters() if p.requires_grad}
    return {"ids": ro.completion_ids, "ref_logp": ref_logp, "loss": loss.item(), "norm": norm, "weights": weights}


def _rank(rank: int, init_file: str, out_dir: str, kind: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor

        from anatomy_lightning.sharding import data_parallel_mesh, full_trainable_state, shard_model

        names = ("data_parallel", "tensor_parallel")
        mesh = data_parallel_mesh(init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=names))
        model, reference, processor, family = _models(kind)
        whole, whole_reference = copy.deepcopy(model), copy.deepcopy(reference)
        shard_model(model, family, mesh)
        if reference is not None:
            shard_model(reference, family, mesh, frozen=True)
        assert all(isinstance(p, DTensor) for p in model.parameters())  # frozen (4-bit too) and trainable
        big = [p for p in model.parameters() if p.shape[0] >= WORLD]
        assert all(p.to_local().numel() < p.numel() for p in big)  # each rank holds its 1/N
        assert any(p.requires_grad for p in big)
        from tests.grpo.test_rollout_fast import _questions

        questions, images = _questions()
        sharded = _step(model, reference, processor, questions, images, family)
        expected = _step(whole, whole_reference, processor, questions, images, family)
        assert torch.equal(sharded["ids"], expected["ids"])  # the same completions, token for token
        torch.testing.assert_close(sharded["ref_logp"], expected["ref_logp"], rtol=1e-5, atol=1e-6)
        assert sharded["loss"] == pytest.approx(expected["loss"], rel=1e-6, abs=1e-7)
        assert sharded["norm"] == pytest.approx(expected["norm"], rel=1e-5)
        assert sharded["weights"].keys() == expected["weights"].keys()
        for name, w in expected["weights"].items():
            torch.testing.assert_close(sharded["weights"][name], w, rtol=1e-5, atol=1e-6, msg=name)
        if reference is not None:  # TR-DPO's reference sync mixes the shards (after freeing gathered copies)
            from anatomy_lightning.grpo.update import sync_reference
            from anatomy_lightning.sharding import full_tensor, reshard

            reshard(model), reshard(reference)
            sync_reference(model, reference, 0.6), sync_reference(whole, whole_reference, 0.6)
            for (name, r), w in zip(reference.named_parameters(), whole_reference.parameters()):
                torch.testing.assert_close(full_tensor(r), w, rtol=1e-5, atol=1e-6, msg=name)
        if kind == "lora":  # the adapter file: every rank gathers, rank 0 writes
            from peft import get_peft_model_state_dict
            from safetensors.torch import load_file

            from anatomy_lightning.models.loading import save_adapter

            state = full_trainable_state(model)
            if rank == 0:
                save_adapter(model, Path(out_dir) / "adapter", state_dict=state)
                saved = load_file(str(Path(out_dir) / "adapter" / "adapter_model.safetensors"))
                want = get_peft_model_state_dict(whole)
                assert saved.keys() == want.keys()
                for name, w in want.items():
                    torch.testing.assert_close(saved[name], w, rtol=1e-5, atol=1e-6, msg=name)
        (Path(out_dir) / f"ok{rank}").write_text(json.dumps({"loss": sharded["loss"]}))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["full", pytest.param("lora", marks=pytest.mark.slow),
                                  pytest.param("qlora", marks=pytest.mark.slow),
                                  pytest.param("generic", marks=pytest.mark.slow)])
def test_a_sharded_policy_rolls_out_and_steps_like_the_whole_model(tmp_path: Path, kind: str) -> None:
    if kind == "qlora":
        from anatomy_lightning.models.loading import check_quantization_supported, resolve_model_path

        try:
            check_quantization_supported("4bit", "cpu")
        except RuntimeError as err:
            pytest.skip(str(err))
        resolve_model_path("tiny-qwen2.5-vl")  # built here, once, not by both ranks at the same time
    # fork: the ranks inherit the imported torch and transformers instead of importing them again
    mp.start_processes(_rank, args=(str(tmp_path / "init"), str(tmp_path), kind), nprocs=WORLD, join=True,
                       start_method="fork")
    losses = [json.loads((tmp_path / f"ok{r}").read_text())["loss"] for r in range(WORLD)]
    assert losses[0] == losses[1]


def test_a_resume_under_a_strategy_that_loads_the_optimiser_itself_keeps_the_new_learning_rate() -> None:
    """ModelParallelStrategy fills the optimiser before `on_load_checkpoint` edits the checkpoint's groups
    (`apply_resumed_settings`: a changed model.learning_rate): the edited settings reach the live optimiser."""
    from types import SimpleNamespace

    from anatomy_lightning.optimization import copy_param_group_settings

    w = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([w], lr=1.0, weight_decay=0.1)
    checkpoint = {"optimizer_states": [{"param_groups": [{"params": [7], "lr": 0.25, "initial_lr": 0.5,
                                                          "weight_decay": 0.0}]}]}
    copy_param_group_settings(checkpoint, SimpleNamespace(state=SimpleNamespace(fn="test"), optimizers=[opt]))
    assert opt.param_groups[0]["lr"] == 1.0  # test / predict restore no optimiser
    copy_param_group_settings(checkpoint, SimpleNamespace(state=SimpleNamespace(fn="fit"), optimizers=[opt]))
    group = opt.param_groups[0]
    assert (group["lr"], group["initial_lr"], group["weight_decay"]) == (0.25, 0.5, 0.0)
    assert group["params"] == [w]


# -- through the CLI: fit, resume, test, export -----------------------------------------------------

START_DUMP = {"class_path": "tests.support.state_dump.StepStartDump"}


def _cli(folder: Path, dump: str, *args: str) -> None:
    """`python -m anatomy_lightning <args>` in `folder` (the runs of one test share its embedding cache)."""
    import sys

    log = folder / f"{dump}.log"
    with log.open("w") as out:
        result = subprocess.run([sys.executable, "-m", "anatomy_lightning", *args], cwd=folder,
                                env=run_env(folder / dump, folder.parent / "cache"), stdout=out,
                                stderr=subprocess.STDOUT, timeout=600)
    check(result, log)


def _rows(folder: Path, dump: str, name: str = "rank") -> list[list[dict]]:
    if name == "rank":
        return [read_dump(folder / dump, rank) for rank in range(WORLD)]
    return [[json.loads(line) for line in (folder / dump / f"{name}{rank}.jsonl").read_text().splitlines()]
            for rank in range(WORLD)]


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three steps of the shrunken demo under ModelParallelStrategy on two CPU ranks (checkpoint at step 2)."""
    folder = tmp_path_factory.mktemp("fsdp") / "run"
    folder.mkdir()
    override = write_override(folder, max_steps=3, val_every=100, n_train=32, extra_callbacks=(START_DUMP,))
    _cli(folder, "dump", *fit_command(override)[3:], *MODEL_PARALLEL, SPREAD)
    return folder


@pytest.mark.slow
def test_model_parallel_fit_keeps_sharded_weights_in_step_and_resumes_tests_and_exports(sharded_run: Path) -> None:
    from anatomy_lightning.checkpointing import load_checkpoint_data
    from anatomy_lightning.export import export

    run = sharded_run
    ranks = _rows(run, "dump")
    assert [r["step"] for r in ranks[0]] == [r["step"] for r in ranks[1]] == [1, 2, 3]
    for r0, r1 in zip(*ranks):
        assert r0["sharded"] and r1["sharded"]  # the trainable weights are DTensors
        assert r0["weights"] == r1["weights"], f"step {r0['step']}: the gathered weights differ between ranks"
    assert len({r["weights"] for r in ranks[0]}) == 3  # every step changed them

    # one file per checkpoint (rank 0 writes the gathered trainable weights), not a folder of shards
    ckpt = run / "checkpoints" / "demo"
    assert (ckpt / "step=2.ckpt").is_file() and (ckpt / "last.ckpt").is_file()
    saved = load_checkpoint_data(ckpt / "step=2.ckpt", map_location="cpu")
    assert saved["global_step"] == 2 and saved["state_dict"]
    assert all(k.startswith("policy.") and type(v) is torch.Tensor for k, v in saved["state_dict"].items())

    # resume from step 2: the first resumed step starts from exactly the weights, optimiser state and
    # learning rate the uninterrupted run had there, on both ranks
    override = run / "override.yaml"
    _cli(run, "resumed", *fit_command(override)[3:], *MODEL_PARALLEL, SPREAD, "--ckpt_path", str(ckpt / "step=2.ckpt"))
    start, resumed_start = _rows(run, "dump", "start"), _rows(run, "resumed", "start")
    for rank in range(WORLD):
        at_2 = next(r for r in start[rank] if r["step"] == 2)
        assert [r["step"] for r in resumed_start[rank]] == [2]
        assert {k: v for k, v in resumed_start[rank][0].items()} == at_2, f"rank {rank} resumed elsewhere"
    resumed = _rows(run, "resumed")
    assert [r["step"] for r in resumed[0]] == [r["step"] for r in resumed[1]] == [3]
    assert resumed[0][0]["weights"] == resumed[1][0]["weights"]
    # both ranks train on the batch they had, so they sample and score the same completions (each rank's
    # deferred questions are in the checkpoint, not only rank 0's)
    for rank in range(WORLD):
        for key in ("ids", "group_rewards", "loss"):
            assert resumed[rank][0][key] == ranks[rank][2][key], (rank, key)

    # `test` reads the checkpoint under the same strategy (the weights loaded into the shards)
    predictions = run / "predictions.jsonl"
    _cli(run, "test", "test", "--config", str(DEMO), "--config", str(override), *MODEL_PARALLEL,
         "--ckpt_path", str(ckpt / "step=2.ckpt"), f"--evaluation.predictions_file={predictions}")
    assert len(predictions.read_text().splitlines()) == 8  # every test question, from both ranks
    assert "test/acc" in (run / "test.log").read_text()

    # `export` reads it without any strategy: the whole model, the trained weights in it
    result = export([str(DEMO), str(override)], str(ckpt / "step=2.ckpt"), run / "exported")
    assert result.kind == "full"
    from transformers import AutoModelForImageTextToText

    exported = dict(AutoModelForImageTextToText.from_pretrained(result.out).named_parameters())
    for name, tensor in saved["state_dict"].items():
        torch.testing.assert_close(exported[name.removeprefix("policy.")].detach(), tensor, msg=name)


@pytest.mark.slow
def test_model_parallel_logs_the_losses_of_the_same_run_under_ddp(sharded_run: Path) -> None:
    """Exactly comparable: the same per-rank batches and random streams, the gradients averaged over the
    two ranks either way (FSDP2 reduce-scatters what DDP all-reduces). Only float summation order
    differs, so the weights agree to rounding, not bit for bit."""
    folder = sharded_run.parent / "ddp"
    folder.mkdir()
    override = write_override(folder, max_steps=3, val_every=100, n_train=32)
    _cli(folder, "dump", *fit_command(override)[3:], *DDP, SPREAD)
    for sharded, ddp in zip(_rows(sharded_run, "dump"), _rows(folder, "dump")):
        assert [r["step"] for r in ddp] == [r["step"] for r in sharded] == [1, 2, 3]
        for s, d in zip(sharded, ddp):
            assert not d["sharded"]
            assert s["ids"] == d["ids"] and s["group_rewards"] == d["group_rewards"]
            assert s["loss"] == pytest.approx(d["loss"], rel=1e-5, abs=1e-8), f"step {s['step']} rank {s['rank']}"
            assert s["weights_abs_sum"] == pytest.approx(d["weights_abs_sum"], rel=1e-9)
    assert any(r["loss"] for rows in _rows(folder, "dump") for r in rows)  # a step with a loss to compare
