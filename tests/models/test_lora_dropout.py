"""`models.lora_dropout`: LoRA dropout folded into lora_A keeps a bool mask for backward, with the
same masks, losses and gradients as peft's own dropout (CPU, tiny Qwen2.5-VL, dropout 0.3)."""

from __future__ import annotations

import copy
import weakref

import pytest
import torch

from anatomy_lightning.models.families import family_for_type
from anatomy_lightning.models.lora_dropout import DroppedLinear, fold_lora_dropout
from anatomy_lightning.models.parts import LoraSettings
from anatomy_lightning.models.tiny import build_tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")
P = 0.3


@pytest.fixture(scope="module")
def peft_model():
    from peft import get_peft_model

    model, _ = build_tiny_model("tiny", seed=0)
    lora = get_peft_model(model, LoraSettings(dropout=P).to_peft(family_for_type("qwen2_5_vl")))
    with torch.no_grad():  # a non-identity adapter
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    return lora.train()


def _pass(model, monkeypatch):
    """Loss, gradients, the random stream after, and how many dropped lora_A inputs autograd keeps."""
    lora_a = {id(m.weight) for name, m in model.named_modules() if name.endswith("lora_A.default")}
    made, linear = [], torch.nn.functional.linear

    def recording(x, weight, *a, **k):
        if id(weight) in lora_a:
            made.append(weakref.ref(x))
        return linear(x, weight, *a, **k)

    monkeypatch.setattr(torch.nn.functional, "linear", recording)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    ids = torch.randint(5, 200, (3, 12))
    loss = model(input_ids=ids, use_cache=False).logits.log_softmax(-1)[..., 3].mean()
    alive = sum(r() is not None for r in made)
    loss.backward()
    monkeypatch.undo()
    after = torch.rand(1)  # the random stream must be where peft leaves it
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, alive, len(made), after


def test_folded_dropout_equals_peft_bit_for_bit_and_keeps_no_dropped_copy(peft_model, monkeypatch) -> None:
    folded = copy.deepcopy(peft_model)
    n = fold_lora_dropout(folded)
    layers = peft_model.base_model.model.config.text_config.num_hidden_layers
    assert n >= 2 * layers and all(type(m) is not torch.nn.Dropout for m in folded.modules())
    assert sum(isinstance(m, DroppedLinear) for m in folded.modules()) == n
    loss, grads, alive_peft, made_peft, after = _pass(peft_model, monkeypatch)
    loss2, grads2, alive, made, after2 = _pass(folded, monkeypatch)
    assert made_peft == made == n
    assert alive_peft == made_peft, "peft keeps every dropped input of lora_A for backward"
    assert alive == 0, "folded: rebuilt from the shared input and a bool mask in backward"
    assert torch.equal(loss, loss2) and torch.equal(after, after2)
    assert grads.keys() == grads2.keys() and any("lora_A" in k for k in grads)
    for name, g in grads.items():
        assert torch.equal(grads2[name], g), name


def test_eval_no_grad_and_checkpointing_take_peft_s_path(peft_model) -> None:
    folded = copy.deepcopy(peft_model)
    fold_lora_dropout(folded)
    ids = torch.randint(5, 200, (2, 8))
    with torch.no_grad():
        peft_model.eval(), folded.eval()
        assert torch.equal(peft_model(input_ids=ids).logits, folded(input_ids=ids).logits)
        peft_model.train(), folded.train()
    from torch.utils.checkpoint import checkpoint

    layer = next(m for m in folded.modules() if isinstance(m, DroppedLinear))
    x = torch.randn(4, layer.in_features, requires_grad=True)
    torch.manual_seed(1)
    want = torch.nn.functional.linear(torch.nn.functional.dropout(x, P, True), layer.weight)
    torch.manual_seed(1)
    got = checkpoint(layer, x, use_reentrant=False)
    assert torch.equal(got, want)
    got.sum().backward()
    assert x.grad is not None and layer.weight.grad is not None
