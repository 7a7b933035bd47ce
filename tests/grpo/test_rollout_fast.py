"""The fast rollout path (vision once per image, prefill once per prompt, prompt shared across the
group in the log-prob forwards) against the plain one it replaces: same tokens, same log-probs,
same gradients, on the tiny Qwen2.5-VL in float32."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch

from anatomy_lightning.data.synthetic import SceneGenerator
from anatomy_lightning.grpo import fast_path as F
from anatomy_lightning.grpo import generic_path as H
from anatomy_lightning.grpo import prompts as P
from anatomy_lightning.grpo import rollout as R
from anatomy_lightning.grpo import sequences as S
from anatomy_lightning.models.families import family_for_type, family_of
from anatomy_lightning.models.loading import LoraSettings, enable_gradient_checkpointing
from anatomy_lightning.models.tiny import build_tiny_model

ATOL = 1e-4
QWEN_VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
VISION_AND_TEXT_LORA = r".*(language_model\.layers\.\d+\.self_attn\.(q|v)_proj|visual\.blocks\.\d+\.attn\.qkv)"


def length_reward(completions: list[str], questions: list, **kwargs) -> list[float]:
    """A reward with spread inside every group, so the GRPO step has a gradient (used by import path)."""
    return [float(len(c) % 5) for c in completions]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_tiny_model("tiny", seed=0)


def _lora(model: torch.nn.Module, include_vision: bool = False) -> torch.nn.Module:
    """A peft copy whose adapter is not the identity (lora_B random), so adapter on/off differ."""
    from peft import get_peft_model

    settings = LoraSettings(dropout=0.0)
    if include_vision:
        settings = LoraSettings(dropout=0.0, include_vision=True, target_modules=VISION_AND_TEXT_LORA)
    peft_model = get_peft_model(copy.deepcopy(model), settings.to_peft(family_for_type("qwen2_5_vl")))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return peft_model


@pytest.fixture(scope="module", params=["full", "lora"])
def policy(request, tiny):
    model, processor = tiny
    m = copy.deepcopy(model) if request.param == "full" else _lora(model)
    return m.eval(), processor


def _questions(with_images: bool = True):
    gen = SceneGenerator(seed=0, image_size=56)
    images, questions = {}, []
    for scene, qs in gen.draw(3, with_images=True):
        for q in qs:
            images[q.images[0]] = gen.render(scene)
            questions.append(q if with_images else q.replace(images=[]))
    # one much shorter prompt, so the batch is left padded
    questions[1] = questions[1].replace(question="Which?", options=questions[1].options[:2], answer_index=0)
    return questions, images


@pytest.fixture(scope="module")
def prompt_inputs(tiny):
    questions, images = _questions()
    inputs = P.encode_prompts(questions, tiny[1], images.__getitem__)
    assert not inputs["attention_mask"].all(), "the test batch should contain left padding"
    return inputs


def _ids(processor):
    tok = processor.tokenizer
    vision_ids = tok.convert_tokens_to_ids(list(QWEN_VISION_TOKENS))
    return tok.convert_tokens_to_ids("<|image_pad|>"), tok.pad_token_id, vision_ids


def _rollout(model, processor, inputs, G=3, new_tokens=8, seed=0):
    torch.manual_seed(seed)
    ro = R.generate(model, processor, inputs, G, new_tokens, do_sample=True)
    image_id, pad, _ = _ids(processor)
    ro.completion_ids[1, 3] = image_id  # a sampled vision token must not break the forwards
    stop = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    ro.completion_ids[4, 5] = stop  # one completion that ends early: padding after it
    ro.completion_ids[4, 6:] = pad
    ro.completion_mask, ro.truncated = S.completion_mask_from_ids(ro.completion_ids, [stop], pad)
    return ro


def _naive_logprobs(model, processor, ro):
    image_id, pad, vision_ids = _ids(processor)
    seq = S.sequence_inputs(ro, image_id, pad, vision_ids)
    return H.completion_logprobs(model, seq, ro.completion_ids)


def _loss_mask(processor, ro):
    return (ro.completion_mask * S.vision_token_guard(ro.completion_ids, _ids(processor)[2])).bool()


# -- generation ------------------------------------------------------------------------------------


def test_greedy_generation_matches_hf_generate(policy, prompt_inputs) -> None:
    model, processor = policy
    ours = R.generate(model, processor, prompt_inputs, 1, 12, do_sample=False)
    hf = H.generate_hf(model, processor, prompt_inputs, 1, 12, do_sample=False)
    assert torch.equal(ours.completion_ids, hf.completion_ids)
    assert ours.texts == hf.texts
    assert ours.prompts is not None and ours.prompts.image_features is not None


def test_greedy_generation_text_only_prompts_matches_hf(tiny) -> None:
    model, processor = tiny
    questions, _ = _questions(with_images=False)
    inputs = P.encode_prompts(questions, processor, lambda p: None)
    ours = R.generate(model, processor, inputs, 1, 10, do_sample=False)
    hf = H.generate_hf(model, processor, inputs, 1, 10, do_sample=False)
    assert torch.equal(ours.completion_ids, hf.completion_ids)
    assert ours.prompts.image_features is None


def test_greedy_group_rows_are_identical_copies(tiny, prompt_inputs) -> None:
    """The repeated KV cache gives every row of a group exactly its prompt's continuation."""
    model, processor = tiny
    one = R.generate(model, processor, prompt_inputs, 1, 8, do_sample=False)
    four = R.generate(model, processor, prompt_inputs, 4, 8, do_sample=False)
    assert torch.equal(four.completion_ids, one.completion_ids.repeat_interleave(4, dim=0))


def test_sampling_is_seeded_and_masks_are_consistent(tiny, prompt_inputs) -> None:
    model, processor = tiny
    kw = {"do_sample": True, "temperature": 1.3, "top_k": 50, "top_p": 0.9}
    torch.manual_seed(3)
    a = R.generate(model, processor, prompt_inputs, 4, 8, **kw)
    torch.manual_seed(3)
    b = R.generate(model, processor, prompt_inputs, 4, 8, **kw)
    assert torch.equal(a.completion_ids, b.completion_ids)
    B = prompt_inputs["input_ids"].shape[0] * 4
    assert a.completion_ids.shape[0] == B and 1 <= a.completion_ids.shape[1] <= 8
    assert len(a.texts) == B and a.truncated.shape == (B,)
    assert int(a.completion_ids.max()) < model.config.text_config.vocab_size


def test_stop_token_ends_a_row_and_min_new_tokens_forbids_it(tiny, prompt_inputs) -> None:
    model, processor = tiny
    prompts = F.prepare_prompts(model, prompt_inputs)
    pad = processor.tokenizer.pad_token_id
    greedy = F.sample_completions(model, prompts, 1, 6, stop_ids=[10**6], pad_id=pad, do_sample=False)
    stop = int(greedy[0, 0])  # row 0 says this first: make it a stop token
    ids = F.sample_completions(model, prompts, 1, 6, stop_ids=[stop], pad_id=pad, do_sample=False)
    mask, truncated = S.completion_mask_from_ids(ids, [stop], pad)
    assert mask[0].tolist()[:2] == [1.0, 0.0] and not truncated[0]
    assert (ids[0, 1:] == pad).all(), "a finished row continues with padding"
    forced = F.sample_completions(model, prompts, 1, 6, stop_ids=[stop], pad_id=pad, do_sample=False, min_new_tokens=6)
    assert forced.shape[1] == 6 and not (forced == stop).any()


def test_rows_that_stop_leave_the_batch_without_changing_the_others(tiny, prompt_inputs) -> None:
    model, processor = tiny
    prompts = F.prepare_prompts(model, prompt_inputs)
    pad = processor.tokenizer.pad_token_id
    free = F.sample_completions(model, prompts, 2, 8, stop_ids=[10**6], pad_id=pad, do_sample=False)  # (6, 8)
    stop = int(free[0, 2])  # row 0 stops at its third token; most other rows do not
    ids = F.sample_completions(model, prompts, 2, 8, stop_ids=[stop], pad_id=pad, do_sample=False)
    mask, _ = S.completion_mask_from_ids(free, [stop], pad)
    expected = torch.where(mask.bool(), free, torch.full_like(free, pad))
    assert torch.equal(ids, expected[:, : ids.shape[1]]) and (expected[:, ids.shape[1] :] == pad).all()
    assert (ids[0, 3:] == pad).all() and (ids[1:] != pad).any()


def test_pick_next_token_warpers() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 4.9]])
    assert pick_all(logits, do_sample=False) == {(1, 0)}
    assert pick_all(logits, top_k=1) == {(1, 0)}
    assert pick_all(logits, top_p=1e-6) == {(1, 0)}
    row0 = {a for a, _ in pick_all(logits, top_k=2)}
    assert row0 <= {1, 3} and len(row0) == 2
    assert {b for _, b in pick_all(logits, top_p=0.6)} <= {0, 3}


def pick_all(logits: torch.Tensor, n: int = 200, **kw) -> set[tuple[int, int]]:
    gen = torch.Generator().manual_seed(0)
    kw.setdefault("do_sample", True)
    return {tuple(F.pick_next_token(logits, generator=gen, **kw).tolist()) for _ in range(n)}


# -- log-probs -------------------------------------------------------------------------------------


def test_shared_prompt_logprobs_match_full_sequences(policy, prompt_inputs) -> None:
    model, processor = policy
    ro = _rollout(model, processor, prompt_inputs)
    comp_in = S.mask_vision_tokens(ro.completion_ids, _ids(processor)[2], processor.tokenizer.pad_token_id)
    m = _loss_mask(processor, ro)
    with torch.no_grad():
        naive = _naive_logprobs(model, processor, ro)
        fast = R.rollout_logprobs(model, ro, comp_in)
        chunked = R.rollout_logprobs(model, ro, comp_in, batch_size=ro.group_size)
        rows = slice(3, 9)
        part = R.rollout_logprobs(model, ro, comp_in, rows)
        full = F.full_sequence_logprobs(model, ro, comp_in, slice(0, 9), True, 1.0)
        recomputed = R.rollout_logprobs(model, ro, comp_in, reuse_images=False)
        plain = R.rollout_logprobs(model, S.Rollout(**{**ro.__dict__, "prompts": None}), comp_in)
    for other in (fast, chunked, full, recomputed, plain):
        torch.testing.assert_close(other[m], naive[m], atol=ATOL, rtol=0)
    torch.testing.assert_close(part[m[rows]], naive[rows][m[rows]], atol=ATOL, rtol=0)
    assert torch.isfinite(fast[m]).all()


def test_prompts_with_several_images_keep_features_with_their_prompt(tiny) -> None:
    model, processor = tiny
    questions, images = _questions()
    paths = list(images)
    questions[0] = questions[0].replace(images=paths[:2])
    questions[2] = questions[2].replace(images=[paths[1], paths[0]])
    inputs = P.encode_prompts(questions, processor, images.__getitem__)
    assert inputs["image_grid_thw"].shape[0] == 5  # 2 + 1 + 2 images
    hf = H.generate_hf(model, processor, inputs, 1, 6, do_sample=False)
    ro = R.generate(model, processor, inputs, 1, 6, do_sample=False)
    assert torch.equal(ro.completion_ids, hf.completion_ids) and ro.prompts.images_per_prompt == [2, 1, 2]
    ro = _rollout(model, processor, inputs, G=2)
    comp_in = S.mask_vision_tokens(ro.completion_ids, _ids(processor)[2], processor.tokenizer.pad_token_id)
    m = _loss_mask(processor, ro)
    with torch.no_grad():
        naive = _naive_logprobs(model, processor, ro)
        for reuse in (True, False):
            fast = R.rollout_logprobs(model, ro, comp_in, batch_size=2, reuse_images=reuse)
            torch.testing.assert_close(fast[m], naive[m], atol=ATOL, rtol=0)


def test_temperature_divides_the_logits(tiny, prompt_inputs) -> None:
    model, processor = tiny
    ro = _rollout(model, processor, prompt_inputs)
    comp_in = S.mask_vision_tokens(ro.completion_ids, _ids(processor)[2], processor.tokenizer.pad_token_id)
    image_id, pad, vision_ids = _ids(processor)
    with torch.no_grad():
        naive = H.completion_logprobs(model, S.sequence_inputs(ro, image_id, pad, vision_ids), ro.completion_ids, 0.7)
        fast = R.rollout_logprobs(model, ro, comp_in, temperature=0.7)
    m = _loss_mask(processor, ro)
    torch.testing.assert_close(fast[m], naive[m], atol=ATOL, rtol=0)


def test_rows_must_be_whole_groups(tiny, prompt_inputs) -> None:
    model, processor = tiny
    ro = _rollout(model, processor, prompt_inputs)
    with pytest.raises(ValueError, match="whole groups"):
        R.rollout_logprobs(model, ro, ro.completion_ids, slice(1, 4))


def _grads(model, fn) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    fn().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_match_full_sequences(policy, prompt_inputs, checkpointing: bool) -> None:
    """Same gradient for every trainable weight (LoRA, or all weights incl. the vision tower)."""
    model, processor = policy
    model = copy.deepcopy(model).train()  # no dropout anywhere in these models: train mode is deterministic
    if checkpointing:
        enable_gradient_checkpointing(model)
    ro = _rollout(model, processor, prompt_inputs)
    comp_in = S.mask_vision_tokens(ro.completion_ids, _ids(processor)[2], processor.tokenizer.pad_token_id)
    m = _loss_mask(processor, ro).float()
    weights = torch.linspace(-1, 1, m.shape[0])[:, None] * m  # different advantage per completion
    frozen = R.vision_frozen(model)
    naive = _grads(model, lambda: (_naive_logprobs(model, processor, ro) * weights).sum())
    fast = _grads(model, lambda: (R.rollout_logprobs(model, ro, comp_in, reuse_images=frozen) * weights).sum())
    assert naive.keys() == fast.keys() and naive
    for name in naive:
        torch.testing.assert_close(fast[name], naive[name], atol=1e-4, rtol=1e-3, msg=name)
    if frozen:
        assert all("lora_" in n for n in fast)
    else:
        assert any(".visual." in n for n in fast), "a trainable vision tower must get gradients"
    assert any(g.abs().sum() > 0 for g in fast.values())


def test_vision_frozen(tiny) -> None:
    model, _ = tiny
    assert not R.vision_frozen(model)  # full fine-tuning: the tower trains
    assert R.vision_frozen(_lora(model))
    assert not R.vision_frozen(_lora(model, include_vision=True))
    assert not R.vision_frozen(torch.nn.Linear(2, 2)) and F.vl_backbone(torch.nn.Linear(2, 2)) is None


def test_vision_adapter_reference_recomputes_image_features(tiny, prompt_inputs) -> None:
    """With LoRA on the vision tower, adapter-off features differ from the rollout's: recompute them."""
    model, processor = tiny
    peft_model = _lora(model, include_vision=True).eval()
    ro = _rollout(peft_model, processor, prompt_inputs)
    comp_in = S.mask_vision_tokens(ro.completion_ids, _ids(processor)[2], processor.tokenizer.pad_token_id)
    m = _loss_mask(processor, ro)
    with torch.no_grad(), peft_model.disable_adapter():
        naive = _naive_logprobs(peft_model, processor, ro)
        right = R.rollout_logprobs(peft_model, ro, comp_in, reuse_images=False)
        stale = R.rollout_logprobs(peft_model, ro, comp_in, reuse_images=True)
    torch.testing.assert_close(right[m], naive[m], atol=ATOL, rtol=0)
    assert (stale[m] - naive[m]).abs().max() > 1e-3


# -- the training step -----------------------------------------------------------------------------


def test_training_step_updates_lora_with_kl_and_two_iterations(tmp_path) -> None:
    from torch.utils.data import DataLoader

    from anatomy_lightning.module import GRPOModule

    gen = SceneGenerator(seed=0, image_size=56)
    questions = []
    for scene, qs in gen.draw(2, with_images=True):
        path = tmp_path / qs[0].images[0]
        path.parent.mkdir(parents=True, exist_ok=True)
        gen.render(scene).save(path)
        questions += [q.replace(images=[str(path)]) for q in qs]
    module = GRPOModule(
        "tiny-qwen2.5-vl", dtype="float32", lora=LoraSettings(), num_generations=4, max_new_tokens=6,
        rewards={"tests.grpo.test_rollout_fast:length_reward": 1.0}, beta=0.04, num_iterations=2,
        logprob_batch_size=4, learning_rate=1e-2,
    )
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters() if p.requires_grad}
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(questions, batch_size=2, collate_fn=list))
    moved = [n for n, p in module.policy.named_parameters() if p.requires_grad and not torch.equal(before[n], p)]
    assert moved and all("lora_" in n for n in moved)
    assert module.non_finite_steps == 0
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
