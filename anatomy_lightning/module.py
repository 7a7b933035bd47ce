"""`GRPOModule`: the Lightning hooks around one GRPO step. Each step, in order:

  1. roll out G completions per prompt (`grpo.dynamic_sampling.StepSampler` over `grpo.rollout`,
     which picks the family's path) and score them (`grpo.rewards`);
  2. group-normalised advantages (`grpo.advantages`);
  3. reference log-probs (adapter off; skipped when beta = 0) and old log-probs (only when mu > 1);
  4. mu optimiser steps on the clipped surrogate + beta * KL (`grpo.loss`), row chunk by row chunk,
     each skipped if the loss is not finite (with `trainer.accumulate_grad_batches` = N, one step
     per N rollouts, on the mean of their losses).
Manual optimisation, so that `num_iterations` > 1 can reuse one rollout. Evaluation rows, the
report and the predictions file are `grpo.evaluation`; optimiser and schedule `optimization`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from torchmetrics import MeanMetric

from anatomy_lightning.checkpointing import check_weights_fit
from anatomy_lightning.checkpointing.weights import checkpoint_keys, only_keys, saved_weights, without_reference
from anatomy_lightning.data.images import ImageCache
from anatomy_lightning.data.schema import Question
from anatomy_lightning.evaluation_hooks import GreedyEvaluation
from anatomy_lightning.grpo.advantages import GroupAdvantages, group_advantages, resolve_scale_rewards
from anatomy_lightning.grpo.dynamic_sampling import StepSampler
from anatomy_lightning.grpo.evaluation import EvaluationSettings
from anatomy_lightning.grpo.metrics import (
    combine_chunk_metrics,
    dynamic_sample_metrics,
    prompt_tokens,
    same_step_augment_metrics,
    train_metrics,
)
from anatomy_lightning.grpo.preflight import preflight
from anatomy_lightning.grpo.prompts import DEFAULT_PROMPT_TEMPLATE, DEFAULT_SYSTEM_PROMPT, encode_prompts
from anatomy_lightning.grpo.rewards import RewardComputer
from anatomy_lightning.grpo.rollout import Rollouts
from anatomy_lightning.grpo.samples import log_samples
from anatomy_lightning.grpo.sequences import Rollout, mask_vision_tokens, vision_token_guard
from anatomy_lightning.grpo.token_stats import global_token_count
from anatomy_lightning.grpo.update import backward_chunks, prepare_update, sync_due, sync_reference
from anatomy_lightning.guards import check_strategy
from anatomy_lightning.models.families import ModelFamily, family_of
from anatomy_lightning.models.loading import (
    LoraSettings,
    frozen_copy,
    has_adapter,
    load_policy,
    reference_model,
    save_adapter,
)
from anatomy_lightning.optimization import (
    apply_resumed_settings,
    clip_gradients,
    configure_optimization,
    copy_param_group_settings,
    gradient_settings,
    parameter_groups,
    weight_dtype,
)
from anatomy_lightning.settings_check import SettingsError, check_settings, reward_knob_problems
from anatomy_lightning.sharding import (
    check_shardable,
    data_parallel_mesh,
    full_trainable_state,
    is_sharded,
    quant_storage,
    reshard,
    shard_model,
)

log = logging.getLogger(__name__)

DEFAULT_REWARDS = {"accuracy": 1.0, "format": 0.5}  # never mutated: the module copies it
# run-long counters kept in checkpoints: skipped steps, TRL's num_tokens, completions of this rank / all ranks
COUNTERS = ("non_finite_steps", "num_tokens", "completions_generated", "completions_total")


class GRPOModule(GreedyEvaluation, L.LightningModule):
    """GRPO for image-text-to-text models (Qwen2-VL / Qwen2.5-VL, or the built-in tiny one).

    Args:
        model: a built-in tiny name ("tiny-qwen2.5-vl"), a local folder or a hub id.
        dtype: "auto", "bfloat16", "float16" or "float32" for the weights. "auto" follows a "-true"
            trainer.precision (else the checkpoint's own); a contradicting explicit dtype is refused.
        quantization: None, "4bit" (QLoRA: nf4, double quantisation, bf16 compute) or "8bit".
        lora: LoRA settings; None with no quantization means full fine-tuning.
        gradient_checkpointing: trade compute for activation memory (non-reentrant, PEFT-safe).
        min_pixels / max_pixels: the processor's image size bounds (cap visual tokens, never truncate).
        num_generations: G, completions sampled per prompt.
        max_new_tokens, temperature, top_p, top_k: sampling settings for rollouts.
        min_new_tokens: no end-of-turn before this many tokens (0: off; benchmarks fix lengths with it).
        packed_decode: decode on a per-rollout packed copy of the weights (`grpo.packed_decode`: LoRA
            merged, oneDNN layout; about 1.5x faster decoding on a CPU, logits equal to rounding).
            None: on for a float32 Qwen-VL model on the CPU; True: wherever supported; False: never.
        mask_truncated_completions: drop completions that hit max_new_tokens from the loss.
        max_prompt_length: longest prompt in tokens, images included (None: the model's context minus
            max_new_tokens); every prompt is measured before the model loads (`grpo.preflight`).
        truncation_strategy: "raise" stops on longer prompts, naming them; "delete" drops them with a
            warning (ms-swift's names; prompts are never cut, image tokens must stay whole).
        rewards: reward function name or "package.module:function" -> weight
            (None: the default, accuracy 1.0 + format 0.5).
        scale_rewards: "group" (true) divides advantages by the group std, "batch" by the batch std,
            "none" (false) not at all (Dr. GRPO); None: the estimator's own (ms-swift's: grpo group,
            rloo none, reinforce_plus_plus batch).
        std_tol: a group whose reward std is below this has no learning signal.
        dynamic_sample: replace groups without signal by fresh prompts rolled out in the same step
            (ms-swift's `dynamic_sample`, DAPO); after GDQA's same-step rewrites when both are on.
            Every generated completion counts in `train/completions`.
        max_resample_times: resampling rounds per step; after them no-signal groups fill the batch.
        advantage_estimator: grpo | rloo (leave-one-out baseline) | reinforce_plus_plus (batch-normalised; ms-swift's).
        multi_objective_aggregation: sum_then_normalize | normalize_then_sum (GDPO: each reward normalised per group).
        soft_max_length: the soft_overlong reward's L_max in tokens (None: max_new_tokens; ms-swift's name).
        soft_cache_length: the soft_overlong reward's L_cache: its punishment grows from 0 to -1 over these last tokens.
        sync_ref_model: mix the policy into the reference every ref_model_sync_steps (TR-DPO; full FT, beta > 0).
        ref_model_mixup_alpha: ref = alpha * policy + (1 - alpha) * ref at each sync (TRL: 0.6).
        ref_model_sync_steps: optimiser steps between reference syncs (TRL: 512).
        loss_type: grpo | bnpo | dapo | dr_grpo | gpg | cispo | sapo | luspo | vespo (see grpo.loss).
        beta: KL coefficient (k3 estimator); 0 skips the reference forward entirely.
        epsilon_low: the importance ratio's clip range starts at 1 - epsilon_low.
        epsilon_high: the clip range ends at 1 + epsilon_high (DAPO: 0.28); for cispo it is eps_max, the cap
            on the ratio itself, >= 1 (ScaleRL: 5.0).
        delta: two-sided clipping (grpo, bnpo, dapo, dr_grpo, luspo): caps the unclipped ratio at delta,
            > 1 + epsilon_high; null = off.
        sapo_temperature_pos: sapo's gate temperature on tokens with positive advantage (TRL: 1.0).
        sapo_temperature_neg: sapo's gate temperature on tokens with non-positive advantage (TRL: 1.05).
        vespo_k_pos: vespo's power k for A >= 0: how hard low importance weights are damped (TRL: 2.0).
        vespo_lambda_pos: vespo's decay lambda for A >= 0: how hard high importance weights are damped (TRL: 3.0).
        vespo_k_neg: vespo's power k for A < 0 (TRL: 3.0).
        vespo_lambda_neg: vespo's decay lambda for A < 0 (TRL: 2.0).
        importance_sampling_level: "token" (GRPO) or "sequence" (GSPO: one ratio per completion).
        top_entropy_quantile: keep the policy loss only on the top rho share of tokens by entropy (1 = all).
        use_bias_correction_kl: multiply the k3 KL by the importance ratio (TRL's option).
        num_iterations: mu, optimiser steps per rollout (old log-probs kept for the ratio).
        logprob_batch_size: rows per forward when computing log-probs (memory knob); None = all.
        optimizer, learning_rate, weight_decay: adamw | adamw_8bit | paged_adamw_8bit (the CLI's
            --optimizer replaces all three). Clipping and accumulation are the trainer's knobs.
        lr_schedule: constant | linear | cosine after `warmup_steps` of linear warmup; linear and
            cosine reach 0 at trainer.max_steps (the CLI's --lr_scheduler, if given, replaces it).
        freeze_vit: freeze the vision tower (ms-swift's key). null: trained in full fine-tuning (ms-swift
            freezes it), no adapter with lora (as ms-swift); false with lora: adapters on its linear layers too.
        freeze_aligner: the same for the projector (Qwen: the merger, Qwen3-VL also the deepstack mergers).
        freeze_llm: freeze the language model (full fine-tuning) or keep LoRA off it: only the vision side trains.
        vit_lr: learning rate of the vision tower, as its own optimizer parameter group; null: learning_rate.
        aligner_lr: learning rate of the projector, as its own optimizer parameter group; null: learning_rate.
        system_prompt / prompt_template: how a question is shown ({question}, {options}).
    Evaluation knobs are the `evaluation:` section (`EvaluationSettings` as `module.evaluation`).
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
        packed_decode: bool | None = None,
        mask_truncated_completions: bool = False,
        max_prompt_length: int | None = None,
        truncation_strategy: str = "raise",
        rewards: dict[str, float] | None = DEFAULT_REWARDS,
        scale_rewards: bool | str | None = None,
        std_tol: float = 1e-6,
        dynamic_sample: bool = False,
        max_resample_times: int = 3,
        advantage_estimator: str = "grpo",
        multi_objective_aggregation: str = "sum_then_normalize",
        soft_max_length: int | None = None,
        soft_cache_length: int | None = None,
        sync_ref_model: bool = False,
        ref_model_mixup_alpha: float = 0.6,
        ref_model_sync_steps: int = 512,
        loss_type: str = "grpo",
        beta: float = 0.04,
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        delta: float | None = None,
        sapo_temperature_pos: float = 1.0,
        sapo_temperature_neg: float = 1.05,
        vespo_k_pos: float = 2.0,
        vespo_lambda_pos: float = 3.0,
        vespo_k_neg: float = 3.0,
        vespo_lambda_neg: float = 2.0,
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
        freeze_vit: bool | None = None,
        freeze_aligner: bool | None = None,
        freeze_llm: bool = False,
        vit_lr: float | None = None,
        aligner_lr: float | None = None,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
    ) -> None:
        super().__init__()
        # the CLI checked these already; from Python they are checked here, by the same rules
        check_settings(model={k: v for k, v in locals().items() if k not in ("self", "__class__", "lora", "rewards")})
        lora = LoraSettings.coerce(lora)  # however it arrived (YAML, JSON string, flags, hparams)
        rewards = dict(DEFAULT_REWARDS if rewards is None else rewards)  # the real default in hparams
        problems = reward_knob_problems(dict(  # the combinations that need lora and rewards
            sync_ref_model=sync_ref_model, beta=beta, lora=lora, rewards=rewards, soft_cache_length=soft_cache_length,
            soft_max_length=soft_max_length, max_new_tokens=max_new_tokens))
        if problems:
            raise SettingsError(f"{len(problems)} setting(s) out of range: " + "; ".join(problems))
        if multi_objective_aggregation == "normalize_then_sum" and scale_rewards is not None:
            log.warning("model.scale_rewards=%s is not used with normalize_then_sum: the aggregate is divided by "
                        "its batch std (as in TRL)", scale_rewards)
        scale_rewards = resolve_scale_rewards(scale_rewards, advantage_estimator)  # hparams show what is used
        self.save_hyperparameters()
        self.hparams.lora = None if lora is None else dataclasses.asdict(lora)  # plain data in checkpoints
        self.hparams.scale_rewards = scale_rewards  # resolved (the CLI hands hparams its own config values)
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold trainable weights only
        self.reward_computer = RewardComputer(rewards)
        self.evaluation = EvaluationSettings()  # the CLI's `evaluation:` section replaces it
        self.policy: Any = None  # policy, processor and (full fine-tuning) reference: `configure_model`
        self.processor: Any = None
        self.reference: Any = None
        self._load_image = ImageCache().load  # path -> decoded RGB image
        self._eval_rows: list[dict[str, Any]] = []
        self.val_acc = MeanMetric()
        self._val_sums = torch.zeros(1, 2)
        # the Trainer's gradient knobs, applied here (`use_trainer_gradient_settings`); TRL's clip default
        self.accumulate_grad_batches, self.gradient_clip_val, self.gradient_clip_algorithm = gradient_settings()
        self._accumulated = 0  # rollouts whose gradients wait for the next optimiser step
        # the CLI's --optimizer / --lr_scheduler, built in `configure_optimizers` once the policy exists
        self.cli_optimizer: dict[str, Any] | None = None
        self.cli_lr_scheduler: dict[str, Any] | None = None
        self.non_finite_steps = self.num_tokens = self.completions_generated = self.completions_total = 0  # COUNTERS

    def use_trainer_gradient_settings(
        self, accumulate_grad_batches: int = 1, gradient_clip_val: float | None = 1.0,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Apply `trainer.accumulate_grad_batches` / `gradient_clip_val` / `gradient_clip_algorithm`.

        Lightning refuses them under manual optimisation; the CLI hands them here (from Python, call this).
        """
        self.accumulate_grad_batches, self.gradient_clip_val, self.gradient_clip_algorithm = gradient_settings(
            accumulate_grad_batches, gradient_clip_val, gradient_clip_algorithm, self.hparams.num_iterations
        )

    def use_cli_optimizers(self, optimizer: dict[str, Any] | None, lr_scheduler: dict[str, Any] | None) -> None:
        """The CLI's --optimizer / --lr_scheduler: they replace model.optimizer and model.lr_schedule."""
        self.cli_optimizer, self.cli_lr_scheduler = optimizer, lr_scheduler

    # -- model and rollouts --------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Before the model loads: every prompt of the stage measured with the model's processor (`grpo.preflight`)."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and self.policy is None:
            preflight(self.hparams, datamodule, stage)

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        if self._trainer is not None:  # the CLI refuses these before building anything; Python callers here
            check_strategy(self._trainer.strategy)
        mesh = data_parallel_mesh(self.device_mesh)  # ModelParallelStrategy: FSDP2 over its data-parallel ranks
        hp, dtype = self.hparams, self._weight_dtype()
        if mesh is not None:  # the CLI checked already; Python callers here
            check_shardable(hp.quantization, None if self.cli_optimizer else hp.optimizer)
        self.policy, self.processor = load_policy(
            hp.model, dtype=dtype, quantization=hp.quantization, lora=hp.lora,
            gradient_checkpointing=hp.gradient_checkpointing, min_pixels=hp.min_pixels, max_pixels=hp.max_pixels,
            freeze_vit=hp.freeze_vit, freeze_aligner=hp.freeze_aligner, freeze_llm=hp.freeze_llm,
            quant_storage=quant_storage(dtype) if mesh is not None and hp.quantization == "4bit" else None,
        )
        if hp.beta != 0 and not has_adapter(self.policy):
            self.reference = frozen_copy(self.policy)
        self.family: ModelFamily = family_of(self.policy)
        if mesh is not None:  # the reference too: replicated, it would hold the whole model on every rank
            units = [shard_model(self.policy, self.family, mesh)]
            if self.reference is not None:
                units.append(shard_model(self.reference, self.family, mesh, frozen=True))
            log.info("FSDP2: policy%s sharded over %d ranks (%d units each)",
                     " and reference" if self.reference is not None else "", mesh.size(), units[0])
        self.vision_ids = self.family.vision_token_ids(self.policy, self.processor)
        if self.processor.tokenizer.pad_token_id is None:  # completion padding; fed in place of vision tokens
            self.processor.tokenizer.pad_token = self.processor.tokenizer.eos_token
        self.rollouts = Rollouts(self.policy, self.processor, self.family, self.encode, hp.packed_decode)
        sampling = dict(do_sample=True, temperature=hp.temperature, top_p=hp.top_p, top_k=hp.top_k,
                        min_new_tokens=hp.min_new_tokens, max_new_tokens=hp.max_new_tokens)
        self.sampler = StepSampler(self.rollouts, self.score, sampling, hp.num_generations, self.compute_advantages)
        log.info("model family %s (%s path)", self.family.name, self.rollouts.path)

    def _weight_dtype(self) -> str:
        """model.dtype, checked against (or, for "auto", taken from) trainer.precision."""
        return weight_dtype(self.hparams.dtype, self._trainer.precision if self._trainer is not None else None)

    def encode(self, questions: list[Question]) -> dict[str, Tensor]:
        inputs = encode_prompts(
            questions, self.processor, self._load_image, self.hparams.system_prompt, self.hparams.prompt_template,
            self.family,
        )
        return {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in inputs.items()}

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return batch  # batches are lists of questions; tensors are made on the device in `encode`

    def score(self, rollout: Rollout, questions: list[Question]) -> tuple[Tensor, dict[str, Tensor]]:
        """Every reward function gets, besides the texts and questions, TRL's `completion_ids` (token ids up
        to and including the end-of-turn token) and the soft_overlong lengths (ms-swift's names)."""
        hp = self.hparams
        expanded = [q for q in questions for _ in range(rollout.group_size)]
        ids = [row[m.bool()].tolist() for row, m in zip(rollout.completion_ids.cpu(), rollout.completion_mask.cpu())]
        total, per_fn = self.reward_computer(
            rollout.texts, expanded, completion_ids=ids, soft_cache_length=hp.soft_cache_length,
            soft_max_length=hp.max_new_tokens if hp.soft_max_length is None else hp.soft_max_length,
        )
        return total.to(self.device), {k: v.to(self.device) for k, v in per_fn.items()}

    def compute_advantages(self, rewards: Tensor, per_fn: dict[str, Tensor]) -> GroupAdvantages:
        """`grpo.advantages.group_advantages` with this run's estimator, aggregation and scaling (the training
        step and the dynamic sampler's "has signal" both come from here)."""
        hp = self.hparams
        weights = self.reward_computer.weights
        gdpo = hp.multi_objective_aggregation == "normalize_then_sum"
        per_function = torch.stack([per_fn[name] for name in weights], dim=1) if gdpo else None
        return group_advantages(
            rewards, hp.num_generations, scale_rewards=hp.scale_rewards, std_tol=hp.std_tol,
            estimator=hp.advantage_estimator, aggregation=hp.multi_objective_aggregation,
            per_function=per_function, weights=list(weights.values()),
        )

    # -- training ------------------------------------------------------------------------------
    def training_step(self, batch: list[Question], batch_idx: int) -> dict[str, Any]:
        hp, G, sampled = self.hparams, self.hparams.num_generations, batch
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        rounds = int(getattr(datamodule, "replacement_rounds", 0) or 0)  # same-step GDQA rounds
        fresh = hp.max_resample_times if hp.dynamic_sample else 0
        (batch, ro, rewards, per_fn, sel), draws = self.sampler.sample(
            batch, datamodule, self.global_step, fresh, rounds, micro=self._accumulated)
        self.completions_generated += sel.generated
        adv = self.compute_advantages(rewards, per_fn)
        mask = ro.completion_mask * vision_token_guard(ro.completion_ids, self.vision_ids)
        if hp.mask_truncated_completions:
            mask = mask * (~ro.truncated).float().unsqueeze(1)
        metrics = self._optimise(ro, adv, mask.to(self.device))
        if hp.dynamic_sample:
            metrics.update(dynamic_sample_metrics(sel))
        self._log_train(ro, batch, rewards, per_fn, adv, metrics, sel.generated)
        if rounds:  # same-step GDQA: signal before / after replacement
            self.log_dict(same_step_augment_metrics(sel, adv, batch, draws), on_step=True, on_epoch=False,
                          batch_size=len(batch))
        out = {"group_rewards": rewards.detach().view(-1, G).cpu(), "questions": batch}
        if batch is not sampled:  # what the data scheduled, before dynamic sampling replaced groups
            out["sampled_questions"] = sampled
            out["sampled_group_rewards"] = sel.first.rewards.detach().view(-1, G).cpu()
        return out

    def _optimise(self, ro: Rollout, adv: Any, mask: Tensor) -> dict[str, float]:
        """mu optimiser steps on the rollout (see `grpo.update`); every rank takes every skip decision."""
        hp = self.hparams
        comp_in = mask_vision_tokens(ro.completion_ids, self.vision_ids, self.processor.tokenizer.pad_token_id)
        batch = prepare_update(hp, self.policy, reference_model(self.policy, self.reference), self.reference is not None, ro, comp_in, adv, mask,
                               self.rollouts.vision_frozen())
        opt, sched = self.optimizers(), self.lr_schedulers()
        agree = lambda ok: self.trainer.strategy.reduce_boolean_decision(ok, all=True)  # noqa: E731
        # accumulated rollouts each count 1/N: the step follows the mean of their losses
        backward = lambda loss, w: self.manual_backward(loss * (w / self.accumulate_grad_batches))  # noqa: E731
        metrics: dict[str, float] = {}
        for _ in range(hp.num_iterations):
            if self._accumulated == 0:
                opt.zero_grad(set_to_none=True)
            done = backward_chunks(hp, self.policy, batch, backward, agree)
            metrics = combine_chunk_metrics(done[1]) if done else {}  # every rank; token-weighted
            if hp.loss_type == "gpg":  # alpha = groups / groups with signal, over the whole batch
                metrics["alpha"] = adv.has_signal.numel() / max(1, int(adv.has_signal.sum()))
            if done is None:
                self._skip_step(opt, "non-finite loss")
                continue
            metrics["loss"] = done[0]
            self._accumulated += 1
            if self._accumulated < self.accumulate_grad_batches:
                continue  # gradients wait for the next rollout
            self._accumulated = 0
            grad_norm = clip_gradients(opt, self.gradient_clip_val, self.gradient_clip_algorithm)
            if not agree(math.isfinite(grad_norm)):
                self._skip_step(opt, "non-finite gradient")
                continue
            opt.step()
            if sched is not None:
                sched.step()
            metrics["grad_norm"] = grad_norm
            if hp.sync_ref_model and self.reference is not None and sync_due(self.global_step, hp.ref_model_sync_steps):
                if self._sharded:  # mix the shards, not the gathered copies FSDP2 may still hold
                    reshard(self.policy), reshard(self.reference)
                sync_reference(self.policy, self.reference, hp.ref_model_mixup_alpha)  # TRL's SyncRefModelCallback
        return metrics

    def _skip_step(self, opt: Any, why: str) -> None:
        """Drop this step's gradients (and those accumulated with them) and count the skip."""
        self.non_finite_steps += 1
        log.warning("step %d: %s, optimizer step skipped", self.global_step, why)
        opt.zero_grad(set_to_none=True)
        self._accumulated = 0

    @property
    def accumulating(self) -> bool:
        """True between the rollouts of one optimiser step (`trainer.accumulate_grad_batches` > 1): the
        gradients gathered so far are in no checkpoint, so a stop or save waits for the step to finish."""
        return self._accumulated > 0

    def _log_train(self, ro: Rollout, batch: list[Question], rewards: Tensor, per_fn: dict[str, Tensor], adv: Any,
                   metrics: dict[str, float], generated: int) -> None:
        """`train/*` with TRL's tags and meanings, the method's own tags, and a text sample now and then."""
        self.num_tokens += int(global_token_count(torch.tensor(float(prompt_tokens(ro)), device=self.device)
                                                  + ro.completion_mask.sum().to(self.device)))
        # completions sampled so far, every rank and resampling round: the compute the ablation equalises
        self.completions_total += int(global_token_count(torch.tensor(float(generated), device=self.device)))
        logs = train_metrics(ro, rewards, per_fn, adv, metrics, non_finite_steps=self.non_finite_steps,
                             num_tokens=self.num_tokens, completions=self.completions_total,
                             lr=self.optimizers().param_groups[0]["lr"])
        self.log_dict(logs, on_step=True, prog_bar=False, batch_size=len(batch))
        self.log("reward", logs["train/reward"], prog_bar=True, on_step=True, logger=False, batch_size=len(batch))
        every = self.evaluation.sample_every_n_steps
        if every and self.global_step % every == 0 and isinstance(self.logger, TensorBoardLogger) and self.global_rank == 0:
            log_samples(self.logger.experiment, self.global_step, batch, ro.texts, rewards, adv.advantages, per_fn,
                        ro.group_size, self._load_image, prompts=self.evaluation.sample_prompts)

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
        if not has_adapter(self.policy):
            return
        # sharded: every rank gathers the adapter's full weights (a collective), rank 0 writes them
        state = full_trainable_state(self.policy) if self._sharded else None
        if self.global_rank == 0:
            ckpt_cb = self.trainer.checkpoint_callback
            root = Path(ckpt_cb.dirpath) if ckpt_cb is not None and ckpt_cb.dirpath else Path(self.trainer.default_root_dir)
            save_adapter(self.policy, root / "adapter", state_dict=state)
            log.info("LoRA adapter (peft format) written to %s", root / "adapter")

    # -- optimisers and checkpoints --------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        return configure_optimization(
            parameter_groups(self.policy, hp.vit_lr, hp.aligner_lr), optimizer=hp.optimizer,
            learning_rate=hp.learning_rate, weight_decay=hp.weight_decay, lr_schedule=hp.lr_schedule,
            warmup_steps=hp.warmup_steps, max_steps=self.trainer.max_steps,
            cli_optimizer=self.cli_optimizer, cli_lr_scheduler=self.cli_lr_scheduler,
        )

    @property
    def _sharded(self) -> bool:
        """True when FSDP2 sharded the policy (`configure_model` under ModelParallelStrategy)."""
        return self.policy is not None and is_sharded(self.policy)

    def _checkpoint_keys(self) -> set[str]:
        """Trainable weights only, and a synced reference's (`checkpointing.weights`)."""
        return checkpoint_keys(self.policy, self.hparams.sync_ref_model and self.reference is not None)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Sharded: only the checkpoint's keys, so that ModelParallelStrategy gathers the trainable weights to
        rank 0 for a checkpoint, not the frozen base and reference as well. Otherwise every tensor, as always."""
        state = super().state_dict(*args, **kwargs)
        if args or kwargs or not self._sharded:
            return state
        return only_keys(state, self._checkpoint_keys())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep trainable weights only (`_checkpoint_keys`), and the run-long counters."""
        checkpoint["state_dict"] = only_keys(checkpoint["state_dict"], self._checkpoint_keys())
        checkpoint.update({name: getattr(self, name) for name in COUNTERS})
        if isinstance(self.logger, TensorBoardLogger):  # `fit --ckpt_path` continues this TensorBoard run
            checkpoint["tensorboard_version"] = self.logger.version

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.reference is None and checkpoint.get("state_dict"):  # a synced reference, resumed with beta = 0
            checkpoint["state_dict"] = without_reference(checkpoint["state_dict"])
        if "state_dict" not in checkpoint and self._sharded:  # ModelParallelStrategy loaded (and took out) the weights
            saved = saved_weights(self._trainer.ckpt_path if self._trainer is not None else None)
            saved = without_reference(saved) if self.reference is None else saved
            check_weights_fit(self, {**checkpoint, "state_dict": saved},
                              own=super().state_dict())  # still before any step or evaluation
        else:
            check_weights_fit(self, checkpoint)  # another model's checkpoint: one line naming both models
        apply_resumed_settings(checkpoint, self.hparams, self._trainer, self.cli_optimizer or self.cli_lr_scheduler)
        if self._trainer is not None and not self._trainer.strategy.lightning_restore_optimizer:
            copy_param_group_settings(checkpoint, self._trainer)  # the strategy loaded the optimiser already
        for name in COUNTERS:
            setattr(self, name, checkpoint.get(name, 0))
