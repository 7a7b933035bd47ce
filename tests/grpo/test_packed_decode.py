"""Decoding on packed weights (`grpo.packed_decode`) against the model's own forward: the same logits
to float rounding, token after token, for each fast-path family (LoRA merged, rows leaving the
batch), the same sampled tokens, and a fall-back wherever it cannot or should not run."""

from __future__ import annotations

import logging

import pytest
import torch

from anatomy_lightning.data.synthetic import SceneGenerator
from anatomy_lightning.grpo import fast_path as F
from anatomy_lightning.grpo import packed_decode as PD
from anatomy_lightning.grpo.sequences import eval_mode
from anatomy_lightning.module import GRPOModule
from tests.support.standins import standin_image_size

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FAST_FAMILIES = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")


def _policy(family: str, standin, lora: bool):
    module = GRPOModule(model=str(standin(family)), lora={"r": 4, "alpha": 8, "dropout": 0.0} if lora else None,
                        num_generations=2, max_new_tokens=8, beta=0.0)
    module.configure_model()
    gen = SceneGenerator(seed=0, image_size=standin_image_size(family), grid=1, kinds=("position",),
                         questions_per_scene=1, unique_scenes=False)
    images, questions = {}, []
    for scene, qs in gen.draw(2, with_images=True):
        images[qs[0].images[0]] = gen.render(scene)
        questions.append(qs[0])
    questions[1] = questions[1].replace(question="Which?")  # shorter: the batch is left padded
    module._load_image = images.__getitem__
    policy = module.policy.eval()
    if lora:  # a non-identity adapter, so the merge matters
        with torch.no_grad():
            for name, p in policy.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn_like(p) * 0.05)
    return policy, module.processor, module.encode(questions)


def _prefilled(policy, inputs, G: int):
    prompts = F.prepare_prompts(policy, inputs)
    cache, logits = F.prefill(policy, prompts)
    cache.batch_repeat_interleave(G)
    attention = prompts.inputs["attention_mask"].repeat_interleave(G, dim=0)
    return prompts, cache, logits.float().repeat_interleave(G, dim=0), attention


@pytest.mark.parametrize(("family", "lora"), [(f, False) for f in FAST_FAMILIES] + [("qwen2.5-vl", True)])
def test_packed_steps_equal_the_module_forward(family: str, lora: bool, standin) -> None:
    policy, _, inputs = _policy(family, standin, lora)
    assert PD.unsupported_reason(policy) is None
    G, steps = 2, 6
    with torch.no_grad():
        prompts, cache, logits, attention = _prefilled(policy, inputs, G)
        _, cache2, _, _ = _prefilled(policy, inputs, G)
        module, packed = PD.ModuleDecoder(policy, cache), PD.PackedDecoder(policy, cache2, steps)
        pos = prompts.completion_positions(1, G)
        for t in range(steps):
            tok = logits.argmax(-1)
            if t == 2:  # row 1 stops writing: both decoders drop it
                keep = torch.tensor([i for i in range(tok.shape[0]) if i != 1])
                module.select(keep), packed.select(keep)
                tok, attention, pos = tok[keep], attention[keep], pos[:, keep]
            attention = torch.cat([attention, attention.new_ones(attention.shape[0], 1)], dim=1)
            logits = module.step(tok, pos + t, attention)
            got = packed.step(tok, pos + t, attention)
            assert got.shape == logits.shape
            gap = (got - logits).abs().max().item()
            assert gap < 1e-4 * (1 + logits.abs().max().item()), (family, t, gap)


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3-vl"])
def test_sampled_completions_are_the_same_tokens(family: str, standin, caplog) -> None:
    policy, processor, inputs = _policy(family, standin, lora=True)
    pad = processor.tokenizer.pad_token_id
    with eval_mode(policy), torch.no_grad():
        prompts = F.prepare_prompts(policy, inputs)
        free = F.sample_completions(policy, prompts, 3, 10, [10**6], pad, do_sample=False, packed_decode=False)

        def sample(setting, stops=(10**6,)):
            gen = torch.Generator().manual_seed(0)
            return F.sample_completions(policy, prompts, 3, 10, list(stops), pad, generator=gen, packed_decode=setting)

        with caplog.at_level(logging.INFO, logger=PD.__name__):
            packed = sample(None)  # auto: a float32 model on the CPU
        assert "first step within" in caplog.text and PD._checked[policy] is True
        assert torch.equal(packed, sample(False))
        stops = (int(packed[0, 2]),)  # row 0 stops by its third token: it leaves the batch
        packed = sample(True, stops)
        assert torch.equal(packed, sample(False, stops))
        assert packed.shape[1] > 3 and (packed[0, 3:] == pad).all()
        greedy = F.sample_completions(policy, prompts, 3, 10, [10**6], pad, do_sample=False, packed_decode=True)
        assert torch.equal(greedy, free)


def test_a_packed_step_that_disagrees_switches_it_off(standin, monkeypatch, caplog) -> None:
    policy, processor, inputs = _policy("qwen2.5-vl", standin, lora=False)
    pad = processor.tokenizer.pad_token_id
    step = PD.PackedDecoder.step
    monkeypatch.setattr(PD.PackedDecoder, "step", lambda self, *a: step(self, *a) + 1.0)  # a broken decoder
    with eval_mode(policy), torch.no_grad():
        prompts = F.prepare_prompts(policy, inputs)
        with caplog.at_level(logging.WARNING, logger=PD.__name__):
            ids = F.sample_completions(policy, prompts, 2, 8, [10**6], pad, do_sample=False, packed_decode=True)
        assert "packed decode switched off" in caplog.text and PD._checked[policy] is False
        assert torch.equal(ids, F.sample_completions(policy, prompts, 2, 8, [10**6], pad, do_sample=False,
                                                     packed_decode=False))
        assert not PD.use_packed_decode(policy, True), "a model that failed the check stays on its forward"


def test_where_it_does_not_run(standin, caplog) -> None:
    hybrid, _, _ = _policy("qwen3.5", standin, lora=False)  # linear-attention layers: the generic path anyway
    assert PD.unsupported_reason(hybrid) is not None
    policy, _, inputs = _policy("qwen2.5-vl", standin, lora=False)
    assert PD.use_packed_decode(policy, None) and not PD.use_packed_decode(policy, False)
    half = policy.to(torch.bfloat16)
    assert "float32" in PD.unsupported_reason(half)
    with caplog.at_level(logging.WARNING, logger=PD.__name__):
        assert not PD.use_packed_decode(half, True)
    assert "model.packed_decode=true but" in caplog.text
    with torch.no_grad():
        _, cache, _, _ = _prefilled(policy.float(), inputs, 1)
    assert isinstance(PD.make_decoder(policy, cache, 4, False), PD.ModuleDecoder)
