"""`GRPOModule`: the policy, its reference, rollouts, rewards and the GRPO update.

Order of a training step (manual optimisation, so `num_iterations` > 1 can reuse one rollout):
  1. encode the N prompts of the batch with the model's own processor and chat template;
  2. sample G completions per prompt (no grad; the image is encoded and the prompt prefilled once
     per prompt, and the KV cache repeated for its G completions);
  3. score them (weighted reward functions) and compute group-normalised advantages;
  4. reference log-probs (adapter off; skipped when beta = 0) and old log-probs (only when mu > 1);
  5. mu optimiser steps on the clipped surrogate + beta * KL, each skipped if the loss is not finite
     (with `trainer.accumulate_grad_batches` = N, one step per N rollouts, on the mean of their losses).
Every log-prob forward reuses the rollout's image features (when the vision tower is frozen) and
runs each prompt once for its group (see `grpo.rollout`).
The maths lives in `grpo.loss`; this class only wires it to Lightning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from torchmetrics import MeanMetric

from anatomy_lightning.callbacks.checkpoint import check_weights_fit
from anatomy_lightning.data.images import load_image
from anatomy_lightning.data.schema import Question
from anatomy_lightning.grpo.loss import (
    chunk_weight,
    combine_chunk_metrics,
    completion_length_metrics,
    global_token_count,
    group_advantages,
    grpo_loss,
    high_entropy_threshold,
)
from anatomy_lightning.grpo.dynamic_sampling import Piece, Selection, dynamic_sample, merge_pieces
from anatomy_lightning.grpo.rewards import RewardComputer, extract_choice, reward_metrics
from anatomy_lightning.grpo.rollout import (
    DEFAULT_PROMPT_TEMPLATE,
    DEFAULT_SYSTEM_PROMPT,
    Rollout,
    encode_prompts,
    generate,
    generate_hf,
    mask_vision_tokens,
    rollout_with_completions,
    rollout_logprobs,
    vision_frozen,
    vision_token_guard,
)
from anatomy_lightning.models.families import ModelFamily, family_of
from anatomy_lightning.models.loading import (
    LoraSettings,
    build_optimizer,
    frozen_copy,
    has_adapter,
    load_policy,
    reference_forward,
    save_adapter,
)

log = logging.getLogger(__name__)

LR_SCHEDULES = ("constant", "linear", "cosine")
DEFAULT_REWARDS = {"accuracy": 1.0, "format": 0.5}  # never mutated: the module copies it
# trainer.precision -> the weight dtype it implies ("-true": Lightning casts the module to it)
PRECISION_DTYPE = {"32-true": "float32", "bf16-true": "bfloat16", "16-true": "float16", "64-true": "float64"}


def weight_dtype(dtype: str, precision: str | None) -> str:
    """model.dtype checked against trainer.precision: "auto" takes a "-true" precision's dtype (else
    stays "auto": the checkpoint's own), an explicit dtype that a "-true" precision contradicts is refused."""
    implied = PRECISION_DTYPE.get(str(precision))
    if implied is None:
        return dtype
    if dtype == "auto":
        return implied
    if dtype != implied:
        raise ValueError(
            f"model.dtype={dtype} but trainer.precision={precision} casts the weights to {implied}; "
            "set one of them (model.dtype: auto follows trainer.precision)"
        )
    return dtype


def lr_factor(step: int, schedule: str, warmup_steps: int, total_steps: int | None) -> float:
    """Multiplier of the base learning rate for optimiser step `step` (0-based).

    Warmup: (step + 1) / (warmup + 1) for the first `warmup_steps` steps (the first step already
    learns). Then "constant" stays at 1; "linear" and "cosine" decay to 0 at `total_steps`
    (trainer.max_steps) as Hugging Face's `get_linear_schedule_with_warmup` /
    `get_cosine_schedule_with_warmup` do.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    if not total_steps or total_steps <= 0:
        raise ValueError(f"model.lr_schedule={schedule!r} decays to 0 at trainer.max_steps; set trainer.max_steps")
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class GRPOModule(L.LightningModule):
    """GRPO for image-text-to-text models (Qwen2-VL / Qwen2.5-VL, or the built-in tiny one).

    Args:
        model: a built-in tiny name ("tiny-qwen2.5-vl"), a local folder or a hub id.
        dtype: "auto", "bfloat16", "float16" or "float32" for the weights. "auto" follows
            trainer.precision ("bf16-true" -> bfloat16, "32-true" -> float32, ...; the checkpoint's own
            dtype under a "-mixed" precision); an explicit dtype that a "-true" precision contradicts
            is refused (the CLI fills an unset trainer.precision from it).
        quantization: None, "4bit" (QLoRA: nf4, double quantisation, bf16 compute) or "8bit".
        lora: LoRA settings; None with no quantization means full fine-tuning.
        gradient_checkpointing: trade compute for activation memory (non-reentrant, PEFT-safe).
        min_pixels / max_pixels: the processor's image size bounds (cap visual tokens, never truncate).
        num_generations: G, completions sampled per prompt.
        max_new_tokens, temperature, top_p, top_k: sampling settings for rollouts.
        min_new_tokens: no end-of-turn before this many tokens (0: off; benchmarks fix lengths with it).
        mask_truncated_completions: drop completions that hit max_new_tokens from the loss.
        rewards: reward function name or "package.module:function" -> weight
            (None: the default, accuracy 1.0 + format 0.5).
        scale_rewards: "group" (true) divides advantages by the group std, "batch" by the batch std,
            "none" (false) not at all (Dr. GRPO).
        std_tol: a group whose reward std is below this has no learning signal.
        dynamic_sample: replace the groups without signal by fresh prompts from the training pool
            in play, rolled out in the same step (ms-swift's `dynamic_sample`, DAPO's dynamic
            sampling); every generated completion counts in `train/completions`. With GDQA's
            `augmentation.when: same_step` too, the step's hard groups are first replaced by
            rewrites of the same questions (`augmentation.max_rounds_per_step` rounds), then fresh
            prompts are drawn for what is still without signal (`max_resample_times` rounds).
        max_resample_times: resampling rounds per step; after them no-signal groups fill the batch.
        loss_type: grpo | bnpo | dapo | dr_grpo | gpg (see grpo.loss).
        beta: KL coefficient (k3 estimator); 0 skips the reference forward entirely.
        epsilon_low / epsilon_high: clip range of the importance ratio.
        importance_sampling_level: "token" (GRPO) or "sequence" (GSPO: one ratio per completion).
        top_entropy_quantile: keep the policy loss only on the top rho share of tokens by entropy (1 = all).
        use_bias_correction_kl: multiply the k3 KL by the importance ratio (TRL's option).
        num_iterations: mu, optimiser steps per rollout (old log-probs kept for the ratio).
        logprob_batch_size: rows per forward when computing log-probs (memory knob); None = all.
        optimizer: adamw | adamw_8bit | paged_adamw_8bit (the CLI's --optimizer, if given, replaces
            optimizer, learning_rate and weight_decay, and says so in the log).
        learning_rate, weight_decay: optimisation. Gradient clipping is trainer.gradient_clip_val
            (and gradient_clip_algorithm); accumulation is trainer.accumulate_grad_batches.
        lr_schedule: constant | linear | cosine after `warmup_steps` of linear warmup; linear and
            cosine reach 0 at trainer.max_steps (the CLI's --lr_scheduler, if given, replaces it).
        system_prompt / prompt_template: how a question is shown ({question}, {options}).
        eval_max_new_tokens: completion budget for greedy evaluation (default: max_new_tokens).
        sample_every_n_steps: log a text sample (question, gold, completion, reward) this often.
        predictions_file: where `test` writes its JSONL (default: <log dir>/predictions.jsonl).
    """

    def __init__(
        self,
        model: str = "tiny-qwen2.5-vl",
        dtype: str = "auto",
        quantization: str | None = None,
        lora: LoraSettings | dict[str, Any] | bool | None = None,
        gradient_checkpointing: bool = False,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        num_generations: int = 8,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_new_tokens: int = 0,
        mask_truncated_completions: bool = False,
        rewards: dict[str, float] | None = DEFAULT_REWARDS,
        scale_rewards: bool | str = "group",
        std_tol: float = 1e-6,
        dynamic_sample: bool = False,
        max_resample_times: int = 3,
        loss_type: str = "grpo",
        beta: float = 0.04,
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        importance_sampling_level: str = "token",
        top_entropy_quantile: float = 1.0,
        use_bias_correction_kl: bool = False,
        num_iterations: int = 1,
        logprob_batch_size: int | None = None,
        optimizer: str = "adamw",
        learning_rate: float = 1e-5,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_schedule: str = "constant",
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
        eval_max_new_tokens: int | None = None,
        sample_every_n_steps: int = 50,
        predictions_file: str | None = None,
    ) -> None:
        super().__init__()
        if num_generations < 2:
            raise ValueError(f"model.num_generations must be >= 2 for group advantages, got {num_generations}")
        if max_resample_times < 0:
            raise ValueError(f"model.max_resample_times must be >= 0, got {max_resample_times}")
        if num_iterations < 1:
            raise ValueError(f"model.num_iterations must be >= 1, got {num_iterations}")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"model.lr_schedule={lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
        # Structured settings become their types here, once, however they arrived (YAML, a CLI
        # JSON string, dotted flags, a checkpoint's hparams, Python): LightningCLI passes dicts.
        lora = LoraSettings.coerce(lora)
        rewards = dict(DEFAULT_REWARDS if rewards is None else rewards)  # the real default in hparams
        self.save_hyperparameters()
        self.hparams.lora = None if lora is None else dataclasses.asdict(lora)  # plain data in checkpoints
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold trainable weights only
        self.model_name = model
        self.reward_computer = RewardComputer(rewards)
        self.policy: Any = None
        self.processor: Any = None
        self.reference: Any = None
        self.non_finite_steps = 0
        self._image_cache: dict[str, Any] = {}
        self._eval_rows: list[dict[str, Any]] = []
        self.val_acc = MeanMetric()
        self._val_sums = torch.zeros(1, 2)
        # Lightning's own gradient knobs, handed over by the CLI (`use_trainer_gradient_settings`):
        # the Trainer refuses them under manual optimisation, so this module applies them itself.
        # Clipping defaults to norm 1.0 here and in the CLI (TRL's max_grad_norm default).
        self.accumulate_grad_batches = 1
        self.gradient_clip_val: float | None = 1.0
        self.gradient_clip_algorithm = "norm"
        self._accumulated = 0  # rollouts whose gradients wait for the next optimiser step
        # --optimizer / --lr_scheduler of the CLI (class_path + init_args), built on the trainable
        # parameters in `configure_optimizers` (the policy does not exist before `configure_model`)
        self.cli_optimizer: dict[str, Any] | None = None
        self.cli_lr_scheduler: dict[str, Any] | None = None
        self.num_tokens = 0  # TRL's num_tokens: prompt + completion tokens seen so far
        self.completions_generated = 0  # every sampled completion of this rank (resampled ones too)
        self.completions_total = 0  # the same over every rank (logged as train/completions)
        self._step_draws: dict[str, int] | None = None  # same-step GDQA counts of the current step
        self._logger_step_checked = False

    def use_trainer_gradient_settings(
        self, accumulate_grad_batches: int = 1, gradient_clip_val: float | None = 1.0,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Apply `trainer.accumulate_grad_batches` / `gradient_clip_val` / `gradient_clip_algorithm`.

        Under manual optimisation Lightning refuses these Trainer arguments; the CLI takes them off
        the Trainer and hands them here, so they stay the one place to set them (from Python, call
        this instead of passing them to `Trainer`). `gradient_clip_val` None or 0: no clipping.
        """
        if int(accumulate_grad_batches) < 1:
            raise ValueError(f"trainer.accumulate_grad_batches must be >= 1, got {accumulate_grad_batches}")
        if accumulate_grad_batches > 1 and self.hparams.num_iterations > 1:
            raise ValueError(
                f"trainer.accumulate_grad_batches={accumulate_grad_batches} with model.num_iterations="
                f"{self.hparams.num_iterations}: mu > 1 steps the optimiser several times on one rollout, "
                "accumulation waits for several rollouts; use one of them"
            )
        algorithm = gradient_clip_algorithm or "norm"
        if algorithm not in ("norm", "value"):
            raise ValueError(f"trainer.gradient_clip_algorithm={algorithm!r}; choose norm or value")
        if gradient_clip_val is not None and gradient_clip_val < 0:
            raise ValueError(f"trainer.gradient_clip_val must be >= 0, got {gradient_clip_val}")
        self.accumulate_grad_batches = int(accumulate_grad_batches)
        self.gradient_clip_val = gradient_clip_val or None  # 0 = off, as in Lightning
        self.gradient_clip_algorithm = algorithm

    # -- model ---------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.policy is not None:
            return
        hp = self.hparams
        self.policy, self.processor = load_policy(
            hp.model,
            dtype=self._weight_dtype(),
            quantization=hp.quantization,
            lora=hp.lora,
            gradient_checkpointing=hp.gradient_checkpointing,
            min_pixels=hp.min_pixels,
            max_pixels=hp.max_pixels,
        )
        if hp.beta != 0 and not has_adapter(self.policy):
            self.reference = frozen_copy(self.policy)
        tok = self.processor.tokenizer
        self.family: ModelFamily = family_of(self.policy)
        self.vision_ids = self.family.vision_token_ids(self.policy, self.processor)
        if tok.pad_token_id is None:  # the completion padding and the ids fed in place of vision tokens
            tok.pad_token = tok.eos_token
        log.info("model family %s (%s path)", self.family.name, "fast" if self.family.fast_path else "generic")

    def _weight_dtype(self) -> str:
        """model.dtype, checked against (or, for "auto", taken from) trainer.precision."""
        return weight_dtype(self.hparams.dtype, self._trainer.precision if self._trainer is not None else None)

    def _load_image(self, path: str) -> Any:
        img = self._image_cache.get(path)
        if img is None:
            img = load_image(path)
            if len(self._image_cache) < 4096:  # small synthetic sets stay decoded in memory
                self._image_cache[path] = img
        return img

    def encode(self, questions: list[Question]) -> dict[str, Tensor]:
        inputs = encode_prompts(
            questions, self.processor, self._load_image, self.hparams.system_prompt, self.hparams.prompt_template,
            self.family,
        )
        return {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in inputs.items()}

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return batch  # batches are lists of questions; tensors are made on the device in `encode`

    @contextlib.contextmanager
    def _reference(self):
        if self.reference is not None:
            yield self.reference
        else:
            with reference_forward(self.policy):
                yield self.policy

    # -- rollouts and scoring ------------------------------------------------------------------
    def rollout(self, questions: list[Question], greedy: bool = False) -> Rollout:
        """G completions per question (1, greedy, for evaluation), on the family's path."""
        hp = self.hparams
        G = 1 if greedy else hp.num_generations
        settings = dict(
            num_generations=G,
            max_new_tokens=(hp.eval_max_new_tokens or hp.max_new_tokens) if greedy else hp.max_new_tokens,
            do_sample=not greedy,
            temperature=hp.temperature,
            top_p=hp.top_p,
            top_k=hp.top_k,
            min_new_tokens=0 if greedy else hp.min_new_tokens,
        )
        if self.family.fast_path:
            return generate(self.policy, self.processor, self.encode(questions), **settings)
        inputs, row_inputs = self._expanded_inputs(questions, G)
        return generate_hf(self.policy, self.processor, inputs, expanded=True, row_inputs=row_inputs, **settings)

    def _expanded_inputs(self, questions: list[Question], G: int) -> tuple[dict[str, Tensor], Any]:
        """Generic path: the processor encodes each prompt once per completion, so any image layout
        (tiles, several images, image masks) stays aligned with its row; chunks are re-encoded."""
        rows = [q for q in questions for _ in range(G)]
        inputs = self.encode(rows)
        row_inputs = lambda s, e: inputs if s == 0 and e >= len(rows) else self.encode(rows[s:e])  # noqa: E731
        return inputs, row_inputs

    def score(self, rollout: Rollout, questions: list[Question]) -> tuple[Tensor, dict[str, Tensor]]:
        expanded = [q for q in questions for _ in range(rollout.group_size)]
        total, per_fn = self.reward_computer(rollout.texts, expanded)
        return total.to(self.device), {k: v.to(self.device) for k, v in per_fn.items()}

    # -- dynamic sampling ------------------------------------------------------------------------
    def _piece(self, questions: list[Question]) -> Piece:
        """Roll out and score `questions`: one Piece of a (dynamically sampled) step."""
        hp = self.hparams
        ro = self.rollout(questions)
        rewards, per_fn = self.score(ro, questions)  # NaN where no reward function could score
        signal = group_advantages(rewards, hp.num_generations, scale_rewards=hp.scale_rewards, std_tol=hp.std_tol)
        return Piece(questions, ro, rewards, per_fn, signal.has_signal.cpu())

    def _resample(self, n: int, round_: int) -> Piece | None:
        draw = getattr(self.trainer.datamodule, "resample_questions", None) if self._trainer is not None else None
        if draw is None:
            raise ValueError(
                "model.dynamic_sample needs a datamodule with resample_questions(n, key) "
                "(AnatomyVQADataModule has it); set model.dynamic_sample: false"
            )
        questions = draw(n, f"{self.global_step}/{round_}")
        return self._piece(questions) if questions else None

    def _replacement_rounds(self) -> int:
        """Same-step GDQA rounds per step (`augmentation.when: same_step`), 0 when it is off."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        return int(getattr(datamodule, "replacement_rounds", 0) or 0)

    def _draws(self, first: Piece, rewrite_rounds: int, fresh_rounds: int) -> tuple[Any, dict[str, int]]:
        """`dynamic_sample`'s resample function for this step, and its counts.

        Rewrites first: for up to `rewrite_rounds` rounds, the DataModule's rewrites of the
        scheduled groups still without signal (`replacement_questions`; a question whose rewrite
        got signal is done, the others are rewritten again next round); then, with
        `model.dynamic_sample`, up to `fresh_rounds` rounds of fresh prompts (`_resample`) for what
        is still missing. Without same-step augmentation this is plain dynamic sampling.
        """
        G = self.hparams.num_generations
        rewards = first.rewards.detach().view(-1, G).cpu()
        pending = [g for g in range(len(first.questions)) if not bool(first.has_signal[g])]
        counts = {"rewrite_rounds": 0, "fresh_rounds": 0, "rewrites": 0}

        def draw(n: int, round_: int) -> Piece | None:
            nonlocal pending
            if counts["rewrite_rounds"] < rewrite_rounds and pending:
                counts["rewrite_rounds"] += 1
                pairs = self.trainer.datamodule.replacement_questions(
                    [first.questions[g] for g in pending], rewards[pending], self.global_step, counts["rewrite_rounds"]
                )[:n]
                if pairs:
                    piece = self._piece([r for _, r in pairs])
                    counts["rewrites"] += len(pairs)
                    # originals whose rewrite still has no signal are rewritten again next round
                    pending = [pending[i] for k, (i, _) in enumerate(pairs) if not bool(piece.has_signal[k])]
                    return piece
                pending = []
            if counts["fresh_rounds"] < fresh_rounds:
                counts["fresh_rounds"] += 1
                return self._resample(n, counts["fresh_rounds"])
            return None

        return draw, counts

    def _sample_step(self, batch: list[Question]) -> tuple[list[Question], Rollout, Tensor, dict[str, Tensor], Selection]:
        """The step's rollout: the batch's, or the groups with signal of several rollouts merged
        into one (see grpo.dynamic_sampling): with same-step augmentation the hard no-signal groups
        are replaced by rewrites of the same questions first, then with `dynamic_sample` by fresh
        prompts; groups still without signal fill the batch, the scheduled ones first."""
        hp = self.hparams
        first = self._piece(batch)
        fresh = hp.max_resample_times if hp.dynamic_sample else 0
        rounds = self._replacement_rounds()
        rewrite = rounds if not bool(first.has_signal.all()) else 0
        draw, counts = self._draws(first, rewrite, fresh)
        sel = dynamic_sample(first, draw, rewrite + fresh)
        self._step_draws = counts if rounds else None
        if sel.unchanged:
            return batch, first.rollout, first.rewards, first.per_fn, sel
        return (*self._merged_rollout(sel), sel)

    def _merged_rollout(self, sel: Selection) -> tuple[list[Question], Rollout, Tensor, dict[str, Tensor]]:
        """The picked groups of several rollouts as one Rollout (prompts re-encoded, completions as sampled)."""
        questions, ids, mask, truncated, texts, rewards, per_fn = merge_pieces(sel, self.processor.tokenizer.pad_token_id)
        G = self.hparams.num_generations
        if self.family.fast_path:
            inputs, row_inputs = self.encode(questions), None
        else:
            inputs, row_inputs = self._expanded_inputs(questions, G)
        ro = rollout_with_completions(self.policy, inputs, ids, mask, truncated, texts, G, row_inputs)
        return questions, ro, rewards, per_fn

    # -- training ------------------------------------------------------------------------------
    def training_step(self, batch: list[Question], batch_idx: int) -> dict[str, Any]:
        hp = self.hparams
        G = hp.num_generations
        sampled = batch
        batch, ro, rewards, per_fn, sel = self._sample_step(batch)
        self.completions_generated += sel.generated
        adv = group_advantages(rewards, G, scale_rewards=hp.scale_rewards, std_tol=hp.std_tol)

        mask = ro.completion_mask * vision_token_guard(ro.completion_ids, self.vision_ids)
        if hp.mask_truncated_completions:
            mask = mask * (~ro.truncated).float().unsqueeze(1)
        mask = mask.to(self.device)
        # dapo: the token count of the whole generation batch over every rank (each rank calls it)
        n_items = global_token_count(mask) if hp.loss_type == "dapo" else None
        comp = ro.completion_ids
        comp_in = mask_vision_tokens(comp, self.vision_ids, self.processor.tokenizer.pad_token_id)
        # The rollout's image features were made by the policy before this step's update: valid for the
        # old policy, and for the training forward and the adapter-off reference if the tower is frozen.
        frozen = vision_frozen(self.policy)

        ref_logp = old_logp = None
        with torch.no_grad():
            if hp.beta != 0:
                with self._reference() as ref:
                    ref_logp = rollout_logprobs(
                        ref, ro, comp_in, temperature=hp.temperature, batch_size=hp.logprob_batch_size,
                        reuse_images=frozen and self.reference is None,
                    )
            if hp.num_iterations > 1:
                old_logp = rollout_logprobs(
                    self.policy, ro, comp_in, temperature=hp.temperature, batch_size=hp.logprob_batch_size
                )

        opt = self.optimizers()
        sched = self.lr_schedulers()
        accumulate = self.accumulate_grad_batches
        metrics: dict[str, float] = {}
        B = comp.shape[0]
        # group-aligned row chunks: forward + backward one chunk at a time (activation memory knob)
        step = max(G, (hp.logprob_batch_size or B) // G * G)
        for _ in range(hp.num_iterations):
            if self._accumulated == 0:
                opt.zero_grad(set_to_none=True)
            loss_total, outs, finite = 0.0, [], True
            for s in range(0, B, step):
                rows, groups = slice(s, min(s + step, B)), slice(s // G, (s + step) // G)
                logp, ent = rollout_logprobs(
                    self.policy, ro, comp_in, rows, hp.temperature, reuse_images=frozen, with_entropy=True
                )
                thr = (
                    high_entropy_threshold(ent, mask[rows], hp.top_entropy_quantile)
                    if hp.top_entropy_quantile < 1 else None
                )
                out = grpo_loss(
                    hp.loss_type,
                    logp,
                    adv.advantages[rows],
                    mask[rows],
                    old_logp=None if old_logp is None else old_logp[rows],
                    ref_logp=None if ref_logp is None else ref_logp[rows],
                    beta=hp.beta,
                    epsilon_low=hp.epsilon_low,
                    epsilon_high=hp.epsilon_high,
                    max_completion_length=hp.max_new_tokens,
                    has_signal=adv.has_signal[groups],
                    group_size=G,
                    importance_sampling_level=hp.importance_sampling_level,
                    use_bias_correction_kl=hp.use_bias_correction_kl,
                    entropy=ent,
                    top_entropy_quantile=hp.top_entropy_quantile,
                    entropy_threshold=thr,
                    num_items_in_batch=n_items,
                )
                w = chunk_weight(
                    hp.loss_type, mask[rows], mask, adv.has_signal[groups], adv.has_signal, num_items_in_batch=n_items
                )
                # every rank takes the same decision: under DDP a rank that skipped its backward
                # would leave the others waiting in the gradient all-reduce
                if not self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(out.loss)), all=True):
                    finite = False
                    break
                # accumulated rollouts each count 1/N: the step follows the mean of their losses
                self.manual_backward(out.loss * (w / accumulate))
                loss_total += out.loss.item() * w
                outs.append(out)
            metrics = combine_chunk_metrics(outs) if finite else {}  # every rank; token-weighted
            if hp.loss_type == "gpg":  # alpha = groups / groups with signal, over the whole batch
                metrics["alpha"] = adv.has_signal.numel() / max(1, int(adv.has_signal.sum()))
            if not finite:
                self._skip_step(opt, "non-finite loss")
                continue
            metrics["loss"] = loss_total
            self._accumulated += 1
            if self._accumulated < accumulate:
                continue  # gradients wait for the next rollout
            self._accumulated = 0
            grad_norm = self._clip_gradients(opt)
            if not self.trainer.strategy.reduce_boolean_decision(math.isfinite(grad_norm), all=True):
                self._skip_step(opt, "non-finite gradient")
                continue
            opt.step()
            if sched is not None:
                sched.step()
            metrics["grad_norm"] = grad_norm

        if hp.dynamic_sample:
            metrics["dynamic_sample/rounds"] = float(sel.rounds)
            metrics["dynamic_sample/filled_without_signal"] = float(sel.filled_without_signal)
            metrics["dynamic_sample/first_invalid_ratio"] = 1.0 - float(sel.first.has_signal.float().mean())
            # train/reward is over the kept groups (biased towards groups with spread); this is the
            # mean reward of what the data scheduled, comparable with a run without dynamic sampling
            metrics["dynamic_sample/first_reward"] = float(sel.first.rewards.float().nanmean())
        self._log_train(ro, batch, rewards, per_fn, adv, metrics, mask, sel.generated)
        if self._step_draws is not None:  # same-step GDQA: signal before / after replacement
            self.log_dict({
                "augment/invalid_before": 1.0 - float(sel.first.has_signal.float().mean()),
                "augment/invalid_after": 1.0 - float(adv.has_signal.float().mean()),
                "augment/replaced": float(sum(bool(q.metadata.get("augmented")) for q in batch)),
                "augment/rewrites_sampled": float(self._step_draws["rewrites"]),
            }, on_step=True, on_epoch=False, batch_size=len(batch))
        out = {"group_rewards": rewards.detach().view(-1, G).cpu(), "questions": batch}
        if batch is not sampled:  # what the data scheduled, before dynamic sampling replaced groups
            out["sampled_questions"] = sampled
            out["sampled_group_rewards"] = sel.first.rewards.detach().view(-1, G).cpu()
        return out

    def _skip_step(self, opt: Any, why: str) -> None:
        """Drop this step's gradients (and those accumulated with them) and count the skip."""
        self.non_finite_steps += 1
        log.warning("step %d: %s, optimizer step skipped", self.global_step, why)
        opt.zero_grad(set_to_none=True)
        self._accumulated = 0

    def _clip_gradients(self, opt: Any) -> float:
        """Total gradient norm (before clipping), clipped by trainer.gradient_clip_val / _algorithm."""
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return 0.0
        if self.gradient_clip_algorithm == "value":
            norm = float(torch.nn.utils.clip_grad_norm_(params, float("inf")))
            if self.gradient_clip_val is not None:
                torch.nn.utils.clip_grad_value_(params, self.gradient_clip_val)
            return norm
        return float(torch.nn.utils.clip_grad_norm_(params, self.gradient_clip_val or float("inf")))

    def _log_train(
        self, ro: Rollout, batch: list[Question], rewards: Tensor, per_fn: dict[str, Tensor], adv: Any,
        metrics: dict[str, float], mask: Tensor, generated: int,
    ) -> None:
        """`train/*` with TRL's tags and meanings (reward, rewards/<fn>/mean|std, reward_std,
        frac_reward_zero_std, kl, entropy, clip_ratio/*, completions/*, num_tokens), plus ours."""
        tokens = torch.tensor(float(_prompt_tokens(ro)), device=self.device) + ro.completion_mask.sum().to(self.device)
        self.num_tokens += int(global_token_count(tokens))  # every rank calls it (all_reduce under DDP)
        # completions sampled so far, every rank and resampling round: the compute the ablation equalises
        self.completions_total += int(global_token_count(torch.tensor(float(generated), device=self.device)))
        completions = completion_length_metrics(ro.lengths, ro.truncated)
        logs: dict[str, Any] = {
            **reward_metrics(rewards, per_fn),  # reward, rewards/<fn>/mean|std (NaN = unscored, left out)
            **adv.metrics(),  # reward_std, frac_reward_zero_std
            **completions,
            # our earlier tags for the same quantities
            "invalid_gradient_ratio": 1.0 - adv.has_signal.float().mean(),
            "completion_length/mean": completions["completions/mean_length"],
            "completion_length/min": completions["completions/min_length"],
            "completion_length/max": completions["completions/max_length"],
            "truncated_share": completions["completions/clipped_ratio"],
            "non_finite_steps": float(self.non_finite_steps),
            "num_tokens": float(self.num_tokens),
            "completions": float(self.completions_total),
            "lr": self.optimizers().param_groups[0]["lr"],
            **metrics,
        }
        logs = {f"train/{k}": v for k, v in logs.items()}
        self.log_dict(logs, on_step=True, prog_bar=False, batch_size=len(batch))
        self.log("reward", logs["train/reward"], prog_bar=True, on_step=True, logger=False, batch_size=len(batch))
        every = self.hparams.sample_every_n_steps
        if every and self.global_step % every == 0 and isinstance(self.logger, TensorBoardLogger) and self.global_rank == 0:
            q = batch[0]
            text = (
                f"**question** {q.question}  \n**options** {' | '.join(q.options)}  \n**gold** {q.answer_letter}. {q.answer_text}  \n"
                f"**completion** `{ro.texts[0]}`  \n**reward** {rewards[0].item():.3f}"
            )
            self.logger.experiment.add_text("train/sample", text, self.global_step)

    # -- evaluation ----------------------------------------------------------------------------
    def _evaluate(self, questions: list[Question]) -> list[dict[str, Any]]:
        ro = self.rollout(questions, greedy=True)
        rows = []
        for q, text in zip(questions, ro.texts):
            pred = extract_choice(text, q.options)
            rows.append(
                {
                    "id": q.id,
                    "uid": q.uid,
                    "question": q.question,
                    "images": list(q.images),  # every image the prompt showed, in order
                    "options": q.options,
                    "gold": q.answer_letter,
                    "prediction": None if pred is None else "ABCDEF"[pred],
                    "correct": pred == q.answer_index,
                    "anatomy": q.anatomy,
                    "stage": q.stage,
                    "similarity": q.similarity,
                    "completion": text,
                }
            )
        return rows

    def _num_stages(self) -> int:
        dm = getattr(self.trainer, "datamodule", None)
        return int(getattr(dm, "num_stages", 1) or 1)

    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(self._num_stages(), 2, device=self.device)  # (K, [correct, count])

    def validation_step(self, batch: list[Question], batch_idx: int) -> None:
        for row in self._evaluate(batch):
            self.val_acc.update(float(row["correct"]))
            k = min(int(row["stage"] or 0), self._val_sums.shape[0] - 1)
            self._val_sums[k, 0] += float(row["correct"])
            self._val_sums[k, 1] += 1

    def on_validation_epoch_end(self) -> None:
        self.log("val/acc", self.val_acc, prog_bar=True)  # torchmetrics syncs across ranks and resets
        sums = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")  # same numbers on every rank
        for k in range(sums.shape[0]):
            if sums[k, 1] > 0:
                self.log(f"val/acc_stage_{k}", sums[k, 0] / sums[k, 1])

    def test_step(self, batch: list[Question], batch_idx: int) -> None:
        self._eval_rows.extend(self._evaluate(batch))

    def on_test_epoch_start(self) -> None:
        self._eval_rows = []
        if self.global_rank == 0:
            print(self._test_banner())

    def _test_banner(self) -> str:
        """issue-export: one line naming the split `test` scores and the weights it scores."""
        dm = getattr(self.trainer, "datamodule", None)
        split = dm.describe_test_split() if hasattr(dm, "describe_test_split") else "the test questions"
        if self.trainer.ckpt_path:
            weights = f"checkpoint {self.trainer.ckpt_path}"
        elif self.global_step > 0:
            weights = f"the policy in memory after {self.global_step} steps"
        else:
            weights = f"the base model {self.hparams.model} (zero-shot: no --ckpt_path)"
        return f"test: scoring {split} | model: {weights}"

    def on_test_epoch_end(self) -> None:
        rows = self._gathered_rows()
        acc = sum(r["correct"] for r in rows) / max(1, len(rows))
        self.log("test/acc", acc, rank_zero_only=True)
        by = {"anatomy": defaultdict(list), "stage": defaultdict(list)}
        for r in rows:
            by["anatomy"][r["anatomy"]].append(r["correct"])
            by["stage"][r["stage"]].append(r["correct"])
        for k, vals in by["stage"].items():
            self.log(f"test/acc_stage_{k}", sum(vals) / len(vals), rank_zero_only=True)
        if self.global_rank == 0:
            path = self._write_predictions(rows)
            print(format_report(rows, by))
            print(f"predictions: {path}")
        self.test_results = {"acc": acc, "n": len(rows)}

    def _predictions_path(self) -> Path:
        if self.hparams.predictions_file:
            return Path(self.hparams.predictions_file)
        root = self.trainer.log_dir or self.trainer.default_root_dir
        return Path(root) / "predictions.jsonl"

    # -- predict: greedy answers for a question file (data.predict_file, else the test file) -----
    def on_predict_epoch_start(self) -> None:
        self._eval_rows = []

    def predict_step(self, batch: list[Question], batch_idx: int) -> list[dict[str, Any]]:
        rows = self._evaluate(batch)
        self._eval_rows.extend(rows)
        return rows

    def on_predict_epoch_end(self) -> None:
        rows = self._gathered_rows()
        if self.global_rank == 0:
            print(f"predictions ({len(rows)} questions): {self._write_predictions(rows)}")

    def _gathered_rows(self) -> list[dict[str, Any]]:
        """This stage's evaluation rows from every rank (every rank calls it)."""
        rows = self._eval_rows
        if self.trainer.world_size > 1:
            gathered: list[Any] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
        return rows

    def _write_predictions(self, rows: list[dict[str, Any]]) -> Path:
        """One JSON row per question in model.predictions_file (default <log dir>/predictions.jsonl)."""
        path = self._predictions_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        return path

    # -- optimisation and checkpoints ----------------------------------------------------------
    def use_cli_optimizers(self, optimizer: dict[str, Any] | None, lr_scheduler: dict[str, Any] | None) -> None:
        """The CLI's --optimizer / --lr_scheduler (class_path + init_args): they replace
        model.optimizer/learning_rate/weight_decay and model.lr_schedule/warmup_steps (logged)."""
        self.cli_optimizer, self.cli_lr_scheduler = optimizer, lr_scheduler

    def configure_optimizers(self) -> Any:
        from jsonargparse import Namespace
        from lightning.pytorch.cli import instantiate_class

        def plain(init: Any) -> dict[str, Any]:  # jsonargparse Namespaces -> dicts for instantiate_class
            return init.as_dict() if isinstance(init, Namespace) else dict(init)

        hp = self.hparams
        params = [p for p in self.policy.parameters() if p.requires_grad]
        if self.cli_optimizer:
            if not params:
                raise ValueError("--optimizer got no parameters: nothing is trainable (set lora, or drop quantization)")
            opt = instantiate_class(params, plain(self.cli_optimizer))
            log.info(
                "optimizer %s from --optimizer (lr %g); model.optimizer, model.learning_rate and "
                "model.weight_decay are not used", type(opt).__name__, opt.param_groups[0]["lr"],
            )
        else:
            opt = build_optimizer(hp.optimizer, params, lr=hp.learning_rate, weight_decay=hp.weight_decay)
        if self.cli_lr_scheduler:
            sched = instantiate_class(opt, plain(self.cli_lr_scheduler))
            if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                raise ValueError(
                    "--lr_scheduler ReduceLROnPlateau is not supported: the scheduler is stepped once per "
                    "optimizer step, with no metric; use a step-based scheduler or model.lr_schedule"
                )
            log.info(
                "learning-rate schedule %s from --lr_scheduler, stepped once per optimizer step; "
                "model.lr_schedule and model.warmup_steps are not used", type(sched).__name__,
            )
        else:
            schedule, warmup, total = hp.lr_schedule, max(0, hp.warmup_steps), self.trainer.max_steps
            lr_factor(warmup, schedule, warmup, total)  # refuse a decay without max_steps now, not at step N
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, schedule, warmup, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep trainable weights only: a 7B LoRA checkpoint is tens of MB, not GB."""
        trainable = {f"policy.{n}" for n, p in self.policy.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["non_finite_steps"] = self.non_finite_steps
        checkpoint["num_tokens"] = self.num_tokens
        checkpoint["completions_generated"] = self.completions_generated
        checkpoint["completions_total"] = self.completions_total
        if isinstance(self.logger, TensorBoardLogger):  # `fit --ckpt_path` continues this TensorBoard run
            checkpoint["tensorboard_version"] = self.logger.version

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_weights_fit(self, checkpoint)  # another model's checkpoint: one line naming both models
        self.non_finite_steps = checkpoint.get("non_finite_steps", 0)
        self.num_tokens = checkpoint.get("num_tokens", 0)
        self.completions_generated = checkpoint.get("completions_generated", 0)
        self.completions_total = checkpoint.get("completions_total", 0)

    def on_train_start(self) -> None:
        self._logger_step_checked = False

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """A resumed run logs its first batch at the next TensorBoard step. When the checkpoint was
        written at the end of a run, Lightning's restart bookkeeping adds one step too many (a gap
        after `--ckpt_path last`). The Trainer never accumulates here (see
        `use_trainer_gradient_settings`), so its logging step is simply the number of batches done."""
        if not self._logger_step_checked:  # the first batch: after the loops' own reset on restart
            self._logger_step_checked = True
            loop = self.trainer.fit_loop.epoch_loop
            loop._batches_that_stepped = loop.batch_progress.total.completed

    def on_train_end(self) -> None:
        if self.global_rank == 0 and has_adapter(self.policy):
            ckpt_cb = self.trainer.checkpoint_callback
            root = Path(ckpt_cb.dirpath) if ckpt_cb is not None and ckpt_cb.dirpath else Path(self.trainer.default_root_dir)
            save_adapter(self.policy, root / "adapter")
            log.info("LoRA adapter (peft format) written to %s", root / "adapter")


def _prompt_tokens(ro: Rollout) -> int:
    """Prompt tokens the policy read for this rollout's B completions (each prompt once per completion)."""
    mask = (ro.prompt_inputs or {}).get("attention_mask")
    if mask is None:
        return 0
    n = int(mask.sum())
    expanded = mask.shape[0] == ro.completion_ids.shape[0]  # the generic path encodes prompts per row
    return n if expanded else n * ro.group_size


def format_report(rows: list[dict[str, Any]], by: dict[str, dict[Any, list[bool]]]) -> str:
    """The summary table `test` prints: accuracy overall, per anatomy and per difficulty stage."""
    n = len(rows)
    acc = sum(r["correct"] for r in rows) / max(1, n)
    lines = [f"{'':<32}{'n':>6}{'accuracy':>10}", f"{'overall':<32}{n:>6}{acc:>10.3f}", "per anatomy (gold option):"]
    for name, vals in sorted(by["anatomy"].items(), key=lambda kv: str(kv[0])):
        lines.append(f"  {str(name)[:30]:<30}{len(vals):>6}{sum(vals) / len(vals):>10.3f}")
    lines.append("per difficulty stage (S(q) quantile):")
    for k, vals in sorted(by["stage"].items(), key=lambda kv: (kv[0] is None, kv[0])):
        lines.append(f"  stage {k!s:<24}{len(vals):>6}{sum(vals) / len(vals):>10.3f}")
    return "\n".join(lines)
