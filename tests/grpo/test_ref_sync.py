"""`sync_ref_model` (TR-DPO, TRL's SyncRefModelCallback): the reference follows the policy every N optimiser
steps, and a synced reference survives a checkpoint round trip."""

from __future__ import annotations

import torch

from anatomy_lightning.grpo.update import sync_due, sync_reference
from anatomy_lightning.models.loading import frozen_copy


def test_after_every_n_optimiser_steps_the_reference_is_the_mixup() -> None:
    torch.manual_seed(0)
    policy = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    policy[1].weight.requires_grad_(False)  # frozen (a vision tower, say): never mixed, bit for bit
    reference = frozen_copy(policy)
    initial = {n: p.detach().clone() for n, p in reference.named_parameters()}
    opt = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.1)
    alpha, every = 0.6, 2
    expected = dict(initial)
    for step in range(1, 6):  # optimiser steps 1..5: syncs after steps 2 and 4 (TRL: global_step % N == 0)
        opt.zero_grad()
        policy(torch.randn(4, 3)).square().sum().backward()
        opt.step()
        if sync_due(step, every):
            assert sync_reference(policy, reference, alpha) == 3  # both biases and the first weight
            expected = {n: alpha * p.detach() + (1 - alpha) * expected[n] if p.requires_grad else expected[n]
                        for n, p in policy.named_parameters()}
        for n, r in reference.named_parameters():
            torch.testing.assert_close(r, expected[n])
        assert not any(r.requires_grad for r in reference.parameters())
    assert torch.equal(reference[1].weight, initial["1.weight"])
    assert not torch.equal(reference[0].weight, initial["0.weight"])
    assert [sync_due(s, 512) for s in (0, 1, 511, 512, 1024)] == [False, False, False, True, True]


def test_a_synced_reference_survives_save_and_load(tmp_path) -> None:
    """on_save_checkpoint keeps the reference's trained-part weights with sync_ref_model; loading them back
    into a freshly built reference (still the initial weights) restores the synced one exactly."""
    from anatomy_lightning.module import GRPOModule

    module = GRPOModule(model="tiny-qwen2.5-vl", dtype="float32", beta=0.04, sync_ref_model=True,
                        num_generations=2, max_new_tokens=4)
    module.configure_model()
    initial = {n: p.detach().clone() for n, p in module.reference.named_parameters()}
    with torch.no_grad():
        for p in module.policy.parameters():
            p.add_(0.01)
    sync_reference(module.policy, module.reference, 0.6)
    synced = {n: p.detach().clone() for n, p in module.reference.named_parameters()}
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    trainable = [n for n, p in module.policy.named_parameters() if p.requires_grad]
    assert {k for k in checkpoint["state_dict"] if k.startswith("reference.")} == {f"reference.{n}" for n in trainable}
    torch.save(checkpoint, tmp_path / "c.ckpt")
    loaded = torch.load(tmp_path / "c.ckpt", weights_only=True)

    with torch.no_grad():  # a resumed run: the reference is built again from the initial weights
        for n, p in module.reference.named_parameters():
            p.copy_(initial[n])
    module.on_load_checkpoint(loaded)
    module.load_state_dict(loaded["state_dict"], strict=False)  # what Lightning does next
    for n, p in module.reference.named_parameters():
        assert torch.equal(p, synced[n]), n
    assert any(not torch.equal(synced[n], initial[n]) for n in synced)

    # resumed with beta 0 (no reference): the saved reference is dropped, not refused as foreign weights
    module.reference = None
    module.on_load_checkpoint(loaded)
    assert not any(k.startswith("reference.") for k in loaded["state_dict"])
