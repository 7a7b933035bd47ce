"""A short supervised warm start on the *answer format only*, for randomly initialised policies.

A policy with random weights almost never writes `<think>...</think> <answer>X</answer>`, so every
group would have zero reward spread and GRPO would have nothing to learn from. This step teaches
the format with answers that carry no information about the correct option: the option in each
target (its letter or its text, `answer_form`) is drawn uniformly, independent of the gold answer.
Accuracy after the warm start is therefore at most chance level (below it where a short warm start
has not learnt to copy the option names); everything above that is learnt by GRPO.
Real instruction-tuned checkpoints (Qwen2.5-VL-*-Instruct) do not need it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
from pathlib import Path

import torch

from anatomy_lightning.data.images import load_image
from anatomy_lightning.data.schema import LETTERS, Question
from anatomy_lightning.grpo.prompts import DEFAULT_PROMPT_TEMPLATE, DEFAULT_SYSTEM_PROMPT, encode_prompts
from anatomy_lightning.grpo.sequences import append_tokens
from anatomy_lightning.models.families import family_of
from anatomy_lightning.models.loading import load_policy

log = logging.getLogger(__name__)

THINK = "<think> compare the options </think> "


ANSWER_FORMS = ("letter", "text")


def format_target(q: Question, rng: random.Random, answer_form: str = "letter") -> str:
    """The supervised target: the answer format with an option drawn uniformly at random, so it
    ignores the gold answer. `answer_form` "text" writes the option's text instead of its letter
    (both are accepted by the accuracy reward); a small policy learns image -> name far more easily
    than image -> name -> position in the option list."""
    pick = rng.randrange(len(q.options))
    answer = q.options[pick] if answer_form == "text" else LETTERS[pick]
    return f"{THINK}<answer>{answer}</answer>"  # the caller appends the family's end-of-turn token


def cache_dir(root: str | Path, *depends_on: object, steps: int, answer_form: str) -> Path:
    """Where a warm start is kept under `root`, named by its steps and form and a hash of everything
    else it depends on (model, data settings, template, seed...), so a changed config never reuses
    a stale one while a rerun of the same one does."""
    tag = hashlib.sha1(json.dumps([*depends_on, steps, answer_form], sort_keys=True, default=str).encode()).hexdigest()[:8]
    return Path(root) / f"warm_start_{answer_form}_{steps}steps_{tag}"


def format_warm_start(
    model: str,
    questions: list[Question],
    out_dir: str | Path,
    steps: int = 60,
    batch_size: int = 16,
    learning_rate: float = 1e-3,
    seed: int = 0,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    template: str = DEFAULT_PROMPT_TEMPLATE,
    answer_form: str = "letter",
) -> Path:
    """Fine-tune `model` on format targets and save it (weights + processor) to `out_dir`."""
    if answer_form not in ANSWER_FORMS:
        raise ValueError(f"answer_form={answer_form!r}: use one of {ANSWER_FORMS}")
    out = Path(out_dir)
    if (out / "config.json").exists() and (out / "warm_start.txt").exists():
        log.info("warm start already at %s", out)
        return out
    torch.manual_seed(seed)
    rng = random.Random(seed)
    policy, processor = load_policy(model, dtype="float32")
    tok = processor.tokenizer
    family = family_of(policy)
    end_of_turn = family.end_of_turn_token(policy, processor)  # <|im_end|>, <end_of_turn>, ...
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=learning_rate)
    policy.train()
    cache: dict[str, object] = {}

    def image(path: str) -> object:
        if path not in cache:
            cache[path] = load_image(path)
        return cache[path]

    for step in range(steps):
        batch = rng.sample(questions, min(batch_size, len(questions)))
        prompt = encode_prompts(batch, processor, image, system_prompt, template, family)
        tok.padding_side = "right"  # targets follow the prompt: pad after them
        targets = tok([format_target(q, rng, answer_form) + end_of_turn for q in batch], add_special_tokens=False, padding=True, return_tensors="pt")
        tok.padding_side = "left"
        t_ids, t_mask = targets["input_ids"], targets["attention_mask"]
        inputs = append_tokens(prompt, t_ids, t_mask)  # the target follows the prompt as text
        labels = torch.cat([torch.full_like(prompt["input_ids"], -100), t_ids.masked_fill(t_mask == 0, -100)], 1)
        loss = policy(**inputs, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == steps - 1:
            log.info("warm start step %d/%d: loss %.3f", step + 1, steps, loss.item())
    out.mkdir(parents=True, exist_ok=True)
    policy.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "warm_start.txt").write_text(
        f"format-only warm start of {model}: {steps} steps, batch {batch_size}, lr {learning_rate}, seed {seed}; "
        f"answers ({answer_form}) drawn uniformly at random from the options, independent of the gold answer\n"
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-qwen2.5-vl")
    parser.add_argument("--data", required=True, help="a question file (any supported format)")
    parser.add_argument("--image-root", default=None)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--answer-form", choices=ANSWER_FORMS, default="letter")
    args = parser.parse_args()
    from anatomy_lightning.data.loader import load_questions

    questions = load_questions(args.data, image_root=args.image_root).questions
    print(format_warm_start(args.model, questions, args.out, steps=args.steps, learning_rate=args.lr, answer_form=args.answer_form))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
