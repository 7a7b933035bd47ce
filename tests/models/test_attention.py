"""`models.attention`: grouped K/V heads kept unrepeated for backward, with the same numbers as
transformers' own sdpa path (tiny Qwen2.5-VL: 4 query heads over 2 K/V heads, padded batch)."""

from __future__ import annotations

import weakref

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations import sdpa_attention as hf

from anatomy_lightning.models.attention import install, sdpa_keeping_groups
from anatomy_lightning.models.loading import enable_gradient_checkpointing
from anatomy_lightning.models.tiny import build_tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    m, _ = build_tiny_model("tiny", seed=0)
    assert m.config.text_config.num_attention_heads > m.config.text_config.num_key_value_heads, "needs GQA"
    return m.train()


def _inputs():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 200, (3, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding: transformers passes a mask, so sdpa repeats K/V
    return ids, mask


def _pass(model, attention, monkeypatch):
    """Loss, gradients, and how many repeated K/V tensors the autograd graph keeps alive."""
    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", attention)
    made = []
    repeat = hf.repeat_kv

    def recording(hidden, n_rep):
        out = repeat(hidden, n_rep)
        if out is not hidden:
            made.append(weakref.ref(out))
        return out

    monkeypatch.setattr(hf, "repeat_kv", recording)
    model.zero_grad(set_to_none=True)
    ids, mask = _inputs()
    loss = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.log_softmax(-1)[..., 7].mean()
    alive = sum(r() is not None for r in made[: 2 * model.config.text_config.num_hidden_layers])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, alive


def test_same_loss_and_gradients_with_the_repeats_dropped(model, monkeypatch) -> None:
    want, want_grads, kept_by_hf = _pass(model, hf.sdpa_attention_forward, monkeypatch)
    got, got_grads, kept = _pass(model, sdpa_keeping_groups, monkeypatch)
    layers = model.config.text_config.num_hidden_layers
    assert kept_by_hf == 2 * layers, "transformers' path keeps every repeated K and V for backward"
    assert kept == 0, "the repeats are rebuilt in backward, not kept"
    assert torch.equal(got, want)
    assert want_grads.keys() == got_grads.keys() and len(got_grads) > 10
    for name, g in want_grads.items():
        assert torch.equal(got_grads[name], g), name


def test_steps_aside_under_activation_checkpointing_and_without_grad(model, monkeypatch) -> None:
    want, want_grads, _ = _pass(model, hf.sdpa_attention_forward, monkeypatch)
    with torch.no_grad():
        monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", sdpa_keeping_groups)
        ids, mask = _inputs()
        assert torch.equal(model(input_ids=ids, attention_mask=mask, use_cache=False).logits.log_softmax(-1)[..., 7]
                           .mean(), want)
    import copy

    ckpt = copy.deepcopy(model)
    enable_gradient_checkpointing(ckpt)
    got, got_grads, _ = _pass(ckpt, sdpa_keeping_groups, monkeypatch)
    assert torch.equal(got, want)
    for name, g in want_grads.items():
        assert torch.allclose(got_grads[name], g, atol=1e-6), name


def test_install_registers_it_once(monkeypatch) -> None:
    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", hf.sdpa_attention_forward)
    monkeypatch.setattr("anatomy_lightning.models.attention._installed", False)
    install()
    install()
    assert AttentionInterface._global_mapping["sdpa"] is sdpa_keeping_groups
