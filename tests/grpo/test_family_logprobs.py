"""For every supported family, the log-probs the GRPO loss trains on equal the logits of plain
Hugging Face `generate` at the sampled tokens: one image and two images per prompt, left padding,
row chunks (so the generic path re-encodes its rows), LoRA on, float32."""

from __future__ import annotations

import pytest
import torch

from anatomy_lightning.data.synthetic import SceneGenerator
from anatomy_lightning.grpo import fast_path as F
from anatomy_lightning.grpo import rollout as R
from anatomy_lightning.grpo import sequences as S
from anatomy_lightning.module import GRPOModule
from tests.support.standins import STANDIN_FAMILIES, standin_image_size

pytestmark = pytest.mark.usefixtures("one_torch_thread")
G, NEW_TOKENS = 2, 6


def _questions(family: str):
    gen = SceneGenerator(seed=0, image_size=standin_image_size(family), grid=1, kinds=("position",),
                         questions_per_scene=1, unique_scenes=False)
    images, questions = {}, []
    for scene, qs in gen.draw(2, with_images=True):
        for q in qs:
            images[q.images[0]] = gen.render(scene)
            questions.append(q)
    # the second prompt shows two images (the same scene twice) and a shorter text: left padding
    questions[1] = questions[1].replace(images=questions[1].images * 2, question="Which?")
    return questions, images


@pytest.mark.parametrize("family", STANDIN_FAMILIES)
def test_training_logprobs_equal_generate_logits(family: str, standin) -> None:
    module = GRPOModule(model=str(standin(family)), lora={"r": 4, "alpha": 8, "dropout": 0.0}, num_generations=G,
                        max_new_tokens=NEW_TOKENS, beta=0.0)
    module.configure_model()
    questions, images = _questions(family)
    module._load_image = images.__getitem__
    policy, processor, fam = module.policy.eval(), module.processor, module.family
    with torch.no_grad():  # a non-identity adapter, so LoRA takes part in both computations
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.05)

    rows = [q for q in questions for _ in range(G)]
    expanded = module.encode(rows)
    tok = processor.tokenizer
    stop_ids = fam.stop_token_ids(policy, processor)
    torch.manual_seed(0)
    with torch.no_grad():
        out = policy.generate(**expanded, do_sample=True, max_new_tokens=NEW_TOKENS, output_logits=True,
                              return_dict_in_generate=True, eos_token_id=stop_ids, pad_token_id=tok.pad_token_id)
    comp = out.sequences[:, expanded["input_ids"].shape[1]:]
    want = torch.stack(out.logits, 1).float().log_softmax(-1).gather(-1, comp.unsqueeze(-1)).squeeze(-1)
    mask, truncated = S.completion_mask_from_ids(comp, stop_ids, tok.pad_token_id)

    if fam.fast_path:  # prompts once, shared image features and positions
        ro = S.Rollout(module.encode(questions), comp, mask, truncated, [""] * len(rows), G,
                       prompts=F.prepare_prompts(policy, module.encode(questions)))
    else:  # generic: the processor's own rows, re-encoded per chunk
        ro = S.Rollout(expanded, comp, mask, truncated, [""] * len(rows), G,
                       row_inputs=lambda s, e: module.encode(rows[s:e]))
    comp_in = S.mask_vision_tokens(comp, module.vision_ids, tok.pad_token_id)
    with torch.no_grad():
        got = R.rollout_logprobs(policy, ro, comp_in, batch_size=G)  # one group per forward
    keep = mask.bool()
    assert keep.sum() > 0
    diff = (got - want)[keep].abs().max().item()
    assert diff < 2e-4, f"{family}: training log-probs differ from generate's by {diff:.2e}"
