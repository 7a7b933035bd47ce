"""Where one GRPO step's time goes, part by part, against the matmul FLOP floor of each part (issue #22).

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 PYTHONPATH=. python benchmarks/profile_step.py
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 PYTHONPATH=. python benchmarks/profile_step.py --beta 0.04   # + reference pass

The setting is `trl_speed.py`'s for this project (`--model small --G 8 --new-tokens 64
--prompts-per-step 2 --threads 1`, LoRA, beta = 0, mu = 1, completions forced to full length), with
the checkpoint folder and the questions made by `trl_speed.prepare_inputs`. `GRPOModule` runs under
the real Lightning `Trainer`; nothing in the package is edited. Instead the script wraps, at run
time, the functions a step goes through (`grpo.fast_path.prepare_prompts` / `sample_completions` /
`prefill` / `pick_next_token` / `decode_completions`, `grpo.update.rollout_logprobs` / `grpo_loss`,
the module's `training_step` / `encode` / `score` / `compute_advantages` / `manual_backward` /
`_log_train`, the optimiser, the KV cache's batch repeat, and every `forward` of the policy through
hooks), each with a timer and a `torch.profiler.record_function` label. Time is charged to the
innermost label running (exclusive time), so the parts add up to the step, timed from the end of
the previous optimiser step to the end of this one (as in trl_speed.py); what no label covers is
Lightning's own overhead. Two clocks: wall, and the thread's CPU time. With 1 torch thread the whole
step runs on this thread, and on a shared machine the CPU time is the steadier figure (being
descheduled stretches wall time only), so the table's main column is CPU seconds.

After one warm-up step, `--plain-steps` steps run without the profiler (the table's seconds) and
`--profiled-steps` under `torch.profiler` (CPU activities, no shapes, no stacks), which splits each
part further into GEMM, attention, copy/allocation, other operators and the time between operators
(Python, module calls, dispatch; the profiler's own overhead lands there too, so read it as an
upper bound). Then (`--what-if`) generation and the training pass of the last step's rollout are
timed as run and another way each (generation on the module forward instead of packed weights, and
there with LoRA merged or the KV cache grown in place; LoRA dropout off), interleaved, best of
`--what-if-repeats`: what each way costs, measured.

The floor of a part is its matmul FLOPs, counted from the model config and the step's real token
counts (prompt tokens without padding, 64 image tokens at 224 px, G, completion tokens; prompt once
per group in training as the fast path runs it; causal attention; LoRA's thin matmuls; backward with
frozen base weights = input gradients only), divided by this machine's float32 GEMM rate on 1
thread, measured here on the model's own shapes with rows = the part's tokens per matmul (B for a
decode step, N x P for a prefill, N x P + B x (C - 1) in training): `floor s` at the rate of one
shape repeated (weights hot in cache: the issue's kind of estimate), `floor s (model pass)` at the
rate of one pass over all the layers' distinct weights (what a 16-row decode step really streams).
Parts with no matmul (sampling, Python, rewards, data, logging, Lightning) have a floor of 0.

Prints a Markdown table and writes JSON (default benchmarks/results/profile_step_cpu_<model>_<finetune>[_beta<b>_mu<mu>].json).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import trl_speed  # noqa: E402  (the same checkpoint, data and reward weights as the speed benchmark)

LABEL = "ps:"  # prefix of this script's record_function labels


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(trl_speed.SIZES), default="small")
    p.add_argument("--G", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompts-per-step", type=int, default=2)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--finetune", choices=("lora", "full"), default="lora")
    p.add_argument("--beta", type=float, default=0.0, help="KL coefficient (0, as trl_speed.py: no reference pass)")
    p.add_argument("--num-iterations", type=int, default=1, help="mu (> 1 adds the old-policy log-prob pass)")
    p.add_argument("--plain-steps", type=int, default=2, help="timed steps without the profiler")
    p.add_argument("--profiled-steps", type=int, default=1, help="timed steps under torch.profiler")
    p.add_argument("--gemm-repeats", type=int, default=5, help="timings per GEMM shape (the best one counts)")
    p.add_argument("--what-if", action=argparse.BooleanOptionalAction, default=True,
                   help="after the run, time generation and the training pass with one change each (about 60 s)")
    p.add_argument("--what-if-repeats", type=int, default=3, help="interleaved runs per what-if variant (best counts)")
    p.add_argument("--workdir", default=None, help="checkpoint and data folder (default: a temp folder)")
    p.add_argument("--out", default=None, help="JSON path ('' = do not write)")
    args = p.parse_args(argv)
    if args.plain_steps + args.profiled_steps < 1:
        p.error("need at least one timed step")
    args.device = "cpu"
    if args.out is None:
        extra = "" if args.beta == 0 and args.num_iterations == 1 else f"_beta{args.beta:g}_mu{args.num_iterations}"
        args.out = f"benchmarks/results/profile_step_cpu_{args.model}_{args.finetune}{extra}.json"
    return args


# -- exclusive-time attribution ---------------------------------------------------------------------


class Attribution:
    """A stack of labels; time is charged to the full path of the innermost one (exclusive).

    Two clocks: wall (`perf_counter`) and this thread's CPU time (`thread_time`). With 1 torch thread
    the step's work runs on this thread (the CPU autograd engine runs backward on the caller), and on
    a shared machine CPU time is the steadier figure: being descheduled stretches wall time only.
    """

    def __init__(self) -> None:
        import torch

        self.torch = torch
        self.stack: list[str] = ["step"]
        self.wall: dict[tuple[str, ...], float] = defaultdict(float)
        self.cpu: dict[tuple[str, ...], float] = defaultdict(float)
        self.calls: dict[tuple[str, ...], int] = defaultdict(int)
        self.last, self.last_cpu = time.perf_counter(), time.thread_time()
        self.records: list[Any] = []

    def _charge(self) -> None:
        now, cpu = time.perf_counter(), time.thread_time()
        path = tuple(self.stack)
        self.wall[path] += now - self.last
        self.cpu[path] += cpu - self.last_cpu
        self.last, self.last_cpu = now, cpu

    def push(self, label: str) -> None:
        self._charge()
        self.stack.append(label)
        self.calls[tuple(self.stack)] += 1
        rf = self.torch.profiler.record_function(LABEL + "/".join(self.stack))
        rf.__enter__()
        self.records.append(rf)

    def pop(self) -> None:
        self.records.pop().__exit__(None, None, None)
        self._charge()
        self.stack.pop()

    @contextlib.contextmanager
    def label(self, name: str) -> Any:
        self.push(name)
        try:
            yield
        finally:
            self.pop()

    def wrap(self, fn: Any, name: str | Any) -> Any:
        """`fn` timed under `name` (a string, or a function of the call's arguments giving one)."""

        @functools.wraps(fn)
        def timed(*a: Any, **kw: Any) -> Any:
            with self.label(name(*a, **kw) if callable(name) else name):
                return fn(*a, **kw)

        return timed

    def snapshot(self) -> tuple[dict[tuple[str, ...], float], dict[tuple[str, ...], float], dict[tuple[str, ...], int]]:
        self._charge()
        return dict(self.wall), dict(self.cpu), dict(self.calls)


MISSING: list[str] = []  # wrap targets this version of the package does not have (reported, not fatal)


def patch(obj: Any, attr: str, attribution: Attribution, name: Any, undo: list[Any]) -> None:
    old = getattr(obj, attr, None)
    if old is None:
        MISSING.append(f"{getattr(obj, '__name__', type(obj).__name__)}.{attr}")
        return
    setattr(obj, attr, attribution.wrap(old, name))
    undo.append((obj, attr, old))


# -- parts of a step: which label paths belong to which row -------------------------------------------

ROWS = [  # (key, group, description)
    ("vision", "generation", "vision tower + mrope positions (once per prompt)"),
    ("prefill", "generation", "prefill (prompt once per group) + KV repeat x G"),
    ("decode", "generation", "decode: per-token forwards (+ packing the weights once per rollout)"),
    ("sampling", "generation", "sampling: logits processing + multinomial"),
    ("gen_python", "generation", "Python between tokens (decode loop)"),
    ("gen_other", "generation", "rollout bookkeeping (masks, eval mode)"),
    ("old", "log-prob forwards", "old-policy log-probs (mu > 1 only)"),
    ("ref", "log-prob forwards", "reference log-probs (adapter off; beta > 0 only)"),
    ("train_fwd", "training", "training forward (prompt once per group) + log-softmax"),
    ("loss", "training", "loss (grpo_loss)"),
    ("backward", "training", "backward"),
    ("optimizer", "training", "optimiser (clip, AdamW, zero_grad, schedule)"),
    ("rewards", "rewards, data, logging", "rewards + advantages"),
    ("data", "rewards, data, logging", "data: prompt encoding (template, image, processor), detokenise, collate"),
    ("logging", "rewards, data, logging", "logging and metrics"),
    ("glue", "rewards, data, logging", "GRPO glue in training_step / update (masks, selection, chunk loop)"),
    ("lightning", "Lightning", "Lightning overhead (rest of the step)"),
]
ROW_KEYS = [r[0] for r in ROWS]


def row_of(path: tuple[str, ...]) -> str:
    """The table row a label path (outermost first) is charged to."""
    s = set(path)
    leaf = path[-1]
    if "ref_logprobs" in s:
        return "ref"
    if "old_logprobs" in s:
        return "old"
    if "train_logprobs" in s:
        return "train_fwd"
    if "grpo_loss" in s:
        return "loss"
    if "backward" in s:
        return "backward"
    if s & {"optimizer", "clip", "zero_grad"}:
        return "optimizer"
    if "log_train" in s or "metrics" in s:
        return "logging"
    if s & {"score", "advantages"}:
        return "rewards"
    if s & {"encode", "detokenize", "collate"}:
        return "data"
    if "vision" in s:
        return "vision"
    if "gen_loop" in s:
        if "prefill" in s or leaf == "kv_repeat":
            return "prefill"
        if leaf in ("model", "pack"):  # the module forward or the packed decoder's step / weight packing
            return "decode"
        if leaf == "sampling":
            return "sampling"
        return "gen_python"
    if "generate" in s:
        return "gen_other"
    if "training_step" in s:
        return "glue"
    return "lightning"


def rows_from_paths(excl: dict[tuple[str, ...], float]) -> dict[str, float]:
    out = {k: 0.0 for k in ROW_KEYS}
    for path, sec in excl.items():
        out[row_of(path)] += sec
    return out


# -- the run ----------------------------------------------------------------------------------------


class Recorder:
    """Per step: exclusive wall and CPU time per label path, the step's wall and process CPU time, tokens."""

    def __init__(self, attribution: Attribution) -> None:
        self.att = attribution
        self.steps: list[dict[str, Any]] = []
        self.tokens: dict[str, Any] = {}
        self.restart()

    def restart(self) -> None:
        self.prev = self.att.snapshot()
        self.t, self.cpu = time.perf_counter(), time.process_time()

    def step_end(self, profiled: bool) -> None:
        snap = self.att.snapshot()
        now, cpu = time.perf_counter(), time.process_time()
        diff = lambda new, old: {k: v - old.get(k, 0) for k, v in new.items() if v - old.get(k, 0) > 0}  # noqa: E731
        self.steps.append({"wall": now - self.t, "cpu": cpu - self.cpu, "paths_wall": diff(snap[0], self.prev[0]),
                           "paths_cpu": diff(snap[1], self.prev[1]), "calls": diff(snap[2], self.prev[2]),
                           "profiled": profiled, "tokens": dict(self.tokens)})
        self.prev, self.t, self.cpu = snap, now, cpu


def run(args: argparse.Namespace, workdir: Path) -> tuple[list[dict[str, Any]], Any, dict[str, Any]]:
    import lightning as L
    import torch
    import transformers.cache_utils as cache_utils
    from torch.utils.data import DataLoader

    import anatomy_lightning.grpo.fast_path as fast_path
    import anatomy_lightning.grpo.packed_decode as packed_decode
    import anatomy_lightning.grpo.update as update
    import anatomy_lightning.module as module_mod
    from anatomy_lightning.models.loading import LoraSettings
    from anatomy_lightning.module import GRPOModule

    torch.set_num_threads(args.threads)
    total_steps = 1 + args.plain_steps + args.profiled_steps
    ns = argparse.Namespace(model=args.model, device="cpu", prompts_per_step=args.prompts_per_step,
                            steps=total_steps - 1, image_size=args.image_size)
    model_dir, data = trl_speed.prepare_inputs(ns, workdir)
    questions = trl_speed.load_benchmark_questions(data)

    att = Attribution()
    undo: list[Any] = []
    info: dict[str, Any] = {}
    state = {"in_reference": False, "in_update": False}

    # module-level functions, looked up by name at call time by their callers
    patch(fast_path, "prepare_prompts", att, "vision", undo)
    patch(fast_path, "sample_completions", att, "gen_loop", undo)
    patch(fast_path, "prefill", att, "prefill", undo)
    patch(fast_path, "pick_next_token", att, "sampling", undo)
    patch(fast_path, "decode_completions", att, "detokenize", undo)
    patch(fast_path, "tempered_logprobs", att, "log_softmax", undo)
    patch(fast_path, "generate", att, "generate", undo)
    patch(update, "grpo_loss", att, "grpo_loss", undo)
    patch(update, "rollout_logprobs", att,
          lambda *a, **k: "ref_logprobs" if state["in_reference"] else "old_logprobs" if state["in_update"]
          else "train_logprobs", undo)
    patch(module_mod, "group_advantages", att, "advantages", undo)
    patch(module_mod, "backward_chunks", att, "chunks", undo)
    patch(module_mod, "clip_gradients", att, "clip", undo)
    patch(module_mod, "combine_chunk_metrics", att, "metrics", undo)
    patch(packed_decode.PackedDecoder, "__init__", att, "pack", undo)
    patch(packed_decode.PackedDecoder, "step", att, "model", undo)
    patch(cache_utils.Cache, "batch_repeat_interleave", att, "kv_repeat", undo)
    patch(cache_utils.Cache, "batch_select_indices", att, "kv_select", undo)

    original_prepare = update.prepare_update

    def prepare_update(*a: Any, **kw: Any) -> Any:
        state["in_update"] = True
        try:
            with att.label("prepare_update"):
                return original_prepare(*a, **kw)
        finally:
            state["in_update"] = False

    original_reference = module_mod.reference_model

    @contextlib.contextmanager
    def reference_model(*a: Any, **kw: Any) -> Any:
        with original_reference(*a, **kw) as ref:
            state["in_reference"] = True
            try:
                yield ref
            finally:
                state["in_reference"] = False

    module_mod.prepare_update, module_mod.reference_model = prepare_update, reference_model
    undo += [(module_mod, "prepare_update", original_prepare), (module_mod, "reference_model", original_reference)]

    class ProfiledModule(GRPOModule):
        def configure_model(self) -> None:
            super().configure_model()
            for name, label in (("training_step", "training_step"), ("_optimise", "optimise"),
                                ("_log_train", "log_train"), ("manual_backward", "backward"),
                                ("log_dict", "log_train"), ("log", "log_train"),
                                ("compute_advantages", "advantages")):
                patch(self, name, att, label, [])
            patch(self.sampler, "advantages", att, "advantages", [])
            self.rollouts.encode = att.wrap(self.rollouts.encode, "encode")
            sample = self.rollouts.sample

            def sample_and_count(qs: Any, *a: Any, **kw: Any) -> Any:
                with att.label("rollout"):
                    ro = sample(qs, *a, **kw)
                mask = ro.prompt_inputs["attention_mask"]
                info["tokens"] = {
                    "prompt_tokens": mask.sum(-1).tolist(),
                    "prompt_padded": int(mask.shape[1]),
                    "image_tokens": (ro.prompt_inputs["input_ids"] == self.policy.config.image_token_id)
                    .sum(-1).tolist(),
                    "completion_tokens": ro.completion_mask.sum(-1).tolist(),
                    "completion_width": int(ro.completion_ids.shape[1]),
                    "G": ro.group_size,
                }
                rec.tokens = info["tokens"]
                info["last_rollout"] = ro
                return ro

            self.rollouts.sample = sample_and_count
            self.sampler.score = att.wrap(self.sampler.score, "score")
            # every model call (prefill, decode step, log-prob forwards) under "model"
            def enter(*_: Any) -> None:  # a hook's return value would replace the inputs: return None
                att.push("model")

            def leave(*_: Any) -> None:
                att.pop()

            info["hooks"] = [self.policy.register_forward_pre_hook(enter), self.policy.register_forward_hook(leave)]

    class Hooks(L.Callback):
        def __init__(self) -> None:
            self.done = 0
            self.prof: Any = None

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            for lopt in trainer.strategy._lightning_optimizers:
                lopt.step = att.wrap(lopt.step, "optimizer")
                lopt.zero_grad = att.wrap(lopt.zero_grad, "zero_grad")

        def on_train_batch_end(self, trainer: Any, *_: Any) -> None:
            self.done += 1
            if self.done == 1:  # warm-up done: counters start now
                rec.restart()
            else:
                rec.step_end(profiled=self.prof is not None)
            if self.done == 1 + args.plain_steps and args.profiled_steps:
                self.prof = torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=False, with_stack=False,
                    profile_memory=False,
                )
                self.prof.start()
                rec.restart()
            if self.done == total_steps and self.prof is not None:
                self.prof.stop()

    rec = Recorder(att)
    L.seed_everything(0, workers=True, verbose=False)
    module = ProfiledModule(
        model=str(model_dir), dtype="float32", lora=LoraSettings() if args.finetune == "lora" else None,
        num_generations=args.G, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
        rewards=dict(trl_speed.REWARD_WEIGHTS), loss_type="grpo", beta=args.beta,
        num_iterations=args.num_iterations, learning_rate=1e-5, optimizer="adamw",
    )
    hooks = Hooks()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision="32-true", max_steps=total_steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, default_root_dir=str(workdir / "run"), callbacks=[hooks],
    )
    loader = DataLoader(questions, batch_size=args.prompts_per_step, shuffle=True,
                        collate_fn=att.wrap(list, "collate"))
    trainer.fit(module, loader)
    for obj, attr, old in reversed(undo):
        setattr(obj, attr, old)
    for handle in info.pop("hooks", []):
        handle.remove()
    info["module"] = module
    info["config"] = module.policy.config
    info["lora"] = lora_shapes(module.policy)
    info["trainable_params"] = sum(p.numel() for p in module.policy.parameters() if p.requires_grad)
    return rec.steps, hooks.prof, info


def lora_shapes(model: Any) -> list[tuple[int, int, int]]:
    """(in, out, r) of every LoRA-adapted linear of the language model."""
    out = []
    for name, m in model.named_modules():
        a = getattr(m, "lora_A", None)
        if a is not None and hasattr(a, "keys") and "default" in a and "visual" not in name:
            out.append((a["default"].in_features, m.lora_B["default"].out_features, a["default"].out_features))
    return out


# -- profiler: each part's time by operator class -----------------------------------------------------

GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::_addmm_activation",
            "mkldnn::_linear_pointwise"}  # the last: packed decode's linears (grpo/packed_decode.py)
COPY_OPS = {"aten::cat", "aten::copy_", "aten::index_select", "aten::repeat_interleave", "aten::clone",
            "aten::contiguous", "aten::index", "aten::_to_copy", "aten::stack", "aten::index_put_",
            "aten::_index_put_impl_", "aten::masked_fill", "aten::fill_", "aten::zero_", "aten::zeros",
            "aten::empty", "aten::empty_strided", "aten::full", "aten::ones", "aten::new_ones", "aten::new_zeros"}


def op_class(name: str) -> str:
    if name in GEMM_OPS:
        return "gemm"
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention"
    if name in COPY_OPS:
        return "copy_alloc"
    if name.startswith(LABEL):
        return "between_ops"
    return "other_ops"


def profile_split(prof: Any, steps: int) -> dict[str, Any]:
    """Per table row: profiler self time per step by operator class, and the top operators.

    An operator's time goes to the nearest enclosing label of this script; a label's own self time
    (inside it, outside every operator) is `between_ops`: Python, module calls and dispatch.
    """
    by_row: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    top: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    n_ops: dict[str, float] = defaultdict(float)
    row_cache: dict[int, str] = {}

    def row_for(ev: Any) -> str:
        chain, node = [], ev
        while node is not None and id(node) not in row_cache:
            if node.name.startswith(LABEL):
                row_cache[id(node)] = row_of(tuple(node.name[len(LABEL):].split("/")))
                break
            chain.append(node)
            node = node.cpu_parent
        row = row_cache.get(id(node), "lightning") if node is not None else "lightning"
        for n in chain:
            row_cache[id(n)] = row
        return row

    for ev in prof.events():
        row = row_for(ev)
        sec = ev.self_cpu_time_total / 1e6 / steps
        cls = op_class(ev.name)
        by_row[row][cls] += sec
        if cls != "between_ops":
            top[row][ev.name] += sec
            if ev.cpu_parent is None or ev.cpu_parent.name.startswith(LABEL):  # top-level operators only
                n_ops[row] += 1 / steps
    out = {}
    for row, classes in by_row.items():
        ops = sorted(top[row].items(), key=lambda kv: -kv[1])[:8]
        out[row] = {"by_class": dict(classes), "top_ops": {k: round(v, 4) for k, v in ops},
                    "top_level_ops_per_step": n_ops[row]}
    return out


# -- FLOP floor ------------------------------------------------------------------------------------------


def gemm_rates(cfg: Any, tokens: dict[str, Any], repeats: int) -> dict[str, Any]:
    """GFLOP/s of float32 torch.matmul on 1 thread on each part's shapes: (rows, in) x (in, out), timed in
    thread CPU time (best of `repeats`).

    Two figures per part. `hot`: each shape of one layer timed on its own, the same weight again and
    again (it stays in cache), the best of `repeats`. `model pass` (the floor's rate): one pass over
    every layer's distinct weights, in the model's order, as a forward reads them (for a 16-row
    decode step this streams the weights from memory, which a one-shape loop hides).
    """
    import torch

    t = cfg.text_config
    hd = t.hidden_size // t.num_attention_heads
    q, kv = t.num_attention_heads * hd, t.num_key_value_heads * hd
    layer = [(t.hidden_size, q), (t.hidden_size, kv), (t.hidden_size, kv), (q, t.hidden_size),
             (t.hidden_size, t.intermediate_size), (t.hidden_size, t.intermediate_size),
             (t.intermediate_size, t.hidden_size)]
    head = [(t.hidden_size, t.vocab_size)]
    v = cfg.vision_config
    vlayer = [(v.hidden_size, 3 * v.hidden_size), (v.hidden_size, v.hidden_size),
              (v.hidden_size, v.intermediate_size), (v.hidden_size, v.intermediate_size),
              (v.intermediate_size, v.hidden_size)]
    n = len(tokens["prompt_tokens"])
    B = n * tokens["G"]
    P = sum(tokens["prompt_tokens"])
    C = tokens["completion_width"]
    patches = sum(tokens["image_tokens"]) * v.spatial_merge_size ** 2
    classes = {
        "decode": (B, layer * t.num_hidden_layers + head),
        "prefill": (P, layer * t.num_hidden_layers + head),
        "train": (P + B * (C - 1), layer * t.num_hidden_layers + head),
        "vision": (patches, vlayer * v.depth),
    }
    out: dict[str, Any] = {}
    torch.manual_seed(0)
    for name, (rows, shapes) in classes.items():
        weights = [torch.randn(m, k).t() for k, m in shapes]  # nn.Linear's layout: x @ W^T, W (out, in)
        inputs = {k: torch.randn(rows, k) for k in {k for k, _ in shapes}}
        flops = sum(2.0 * rows * k * m for k, m in shapes)
        best = float("inf")
        for _ in range(repeats + 1):  # the first pass warms up
            t0 = time.thread_time()
            for (k, _), w in zip(shapes, weights):
                torch.matmul(inputs[k], w)
            best = min(best, time.thread_time() - t0)
        hot = []
        for k, m in dict.fromkeys(shapes):  # each distinct shape once
            a, w = inputs[k], torch.randn(m, k).t()
            reps = max(1, int(1e8 / (2 * rows * k * m)))  # ~0.1 GFLOP per timing
            torch.matmul(a, w)
            tb = float("inf")
            for _ in range(repeats):
                t0 = time.thread_time()
                for _ in range(reps):
                    torch.matmul(a, w)
                tb = min(tb, (time.thread_time() - t0) / reps)
            hot.append({"shape": [rows, k, m], "gflops_per_s": 2.0 * rows * k * m / tb / 1e9})
        del weights, inputs
        out[name] = {"rows": rows, "gflops_per_s": flops / best / 1e9, "hot_shapes": hot,
                     "hot_gflops_per_s": max(h["gflops_per_s"] for h in hot)}
    out["best_gflops_per_s"] = max(out[c]["hot_gflops_per_s"] for c in classes)
    return out


def flop_counts(cfg: Any, tokens: dict[str, Any], lora: list[tuple[int, int, int]], beta: float, mu: int,
                grad_on_base: bool) -> dict[str, float]:
    """Matmul FLOPs of each part of one step (multiply-add = 2 FLOPs), real tokens only.

    Per text token: every linear (q, k, v, o, gate, up, down) of every layer, plus LoRA's two thin
    matmuls per adapted linear; lm_head only where logits are kept. Attention: QK^T and PV,
    4 * heads * head_dim * context per token and layer, causal. Backward with frozen base weights
    (LoRA): input gradients of every base matmul (1x forward), LoRA input + weight gradients (2x),
    attention 2x, lm_head input gradient (1x); with full fine-tuning the base matmuls cost 2x.
    """
    t, v = cfg.text_config, cfg.vision_config
    h, L, I, V = t.hidden_size, t.num_hidden_layers, t.intermediate_size, t.vocab_size
    hd = h // t.num_attention_heads
    q, kv = t.num_attention_heads * hd, t.num_key_value_heads * hd
    lin = 2 * L * (h * q + 2 * h * kv + q * h + 3 * h * I)  # per token
    lora_tok = 2 * sum(r * (i + o) for i, o, r in lora)  # per token, every adapted linear
    head = 2 * h * V
    attn = lambda ctx: 4 * L * q * ctx  # noqa: E731  per token attending to ctx keys
    G = tokens["G"]
    P = tokens["prompt_tokens"]  # real prompt tokens per prompt
    comp = tokens["completion_tokens"]  # real tokens per completion
    C = tokens["completion_width"]
    n = len(P)
    # vision tower: patch embedding, blocks (window attention except fullatt blocks), merger
    patches_per_image = [k * v.spatial_merge_size ** 2 for k in tokens["image_tokens"]]
    vh, vI, m2 = v.hidden_size, v.intermediate_size, v.spatial_merge_size ** 2
    patch_in = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    win = (v.window_size // v.patch_size) ** 2  # patches per attention window
    full = set(v.fullatt_block_indexes)
    vision = 0.0
    for npatch in patches_per_image:
        vision += 2 * npatch * patch_in * vh
        for d in range(v.depth):
            ctx = npatch if d in full else min(win, npatch)
            vision += npatch * (2 * vh * 3 * vh + 2 * vh * vh + 3 * 2 * vh * vI + 4 * vh * ctx)
        merged = npatch // m2
        vision += merged * (2 * (vh * m2) ** 2 + 2 * vh * m2 * v.out_hidden_size)
    # prefill: each prompt once (causal), lm_head on its last token
    prefill = sum(p * (lin + lora_tok) + attn(p * (p + 1) / 2) + head for p in P)
    # decode: C - 1 model calls over the B rows (the first token comes from the prefill logits)
    decode = 0.0
    for i, p in enumerate(P):
        for j in range(G):
            steps = min(C, int(comp[i * G + j])) - 1
            decode += sum(lin + lora_tok + head + attn(p + s + 1) for s in range(max(0, steps)))
    # one log-prob pass (training forward, reference, old): prompt once per group + B x (C - 1) tokens
    comp_tok = sum(max(0, min(C, int(c)) - 1) for c in comp)
    comp_attn = sum(attn(P[i // G] + s + 1) for i, c in enumerate(comp) for s in range(max(0, min(C, int(c)) - 1)))
    prompt_lin = sum(P) * lin + n * head
    prompt_attn = sum(attn(p * (p + 1) / 2) for p in P)
    fwd_base = prompt_lin + comp_tok * (lin + head) + prompt_attn + comp_attn
    fwd_lora = (sum(P) + comp_tok) * lora_tok
    train_fwd = fwd_base + fwd_lora
    base_lin_fwd = prompt_lin + comp_tok * (lin + head)
    backward = (2 if grad_on_base else 1) * base_lin_fwd + 2 * fwd_lora + 2 * (prompt_attn + comp_attn)
    ref_fwd = fwd_base  # adapter off
    return {
        "vision": vision, "prefill": prefill, "decode": decode,
        "old": train_fwd if mu > 1 else 0.0, "ref": ref_fwd if beta != 0 else 0.0,
        "train_fwd": mu * train_fwd, "backward": mu * backward,  # mu optimiser iterations per rollout
    }


FLOOR_RATE = {"vision": "vision", "prefill": "prefill", "decode": "decode", "old": "train", "ref": "train",
              "train_fwd": "train", "backward": "train"}


# -- what-if measurements: the same work done another way, on the last step's rollout ------------------


@contextlib.contextmanager
def kv_cache_in_place(extra: int) -> Any:
    """`DynamicLayer.update` writing into a preallocated buffer (room for `extra` more tokens) instead of
    `torch.cat`-ing the whole cache every token; the layer's keys/values are views of the buffer."""
    import transformers.cache_utils as cu

    original = cu.DynamicLayer.update

    def update(self: Any, key_states: Any, value_states: Any, *a: Any, **kw: Any) -> Any:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        old = self.keys.shape[-2] if self.keys.numel() else 0
        new = old + key_states.shape[-2]
        buf = getattr(self, "_ps_buffer", None)
        if (buf is None or self.keys is not getattr(self, "_ps_view", None) or buf[0].shape[-2] < new
                or buf[0].shape[0] != key_states.shape[0]):  # first use, or the cache was repeated / selected
            shape = (*key_states.shape[:-2], new + extra, key_states.shape[-1])
            buf = (key_states.new_empty(shape), value_states.new_empty(shape))
            if old:
                buf[0][..., :old, :] = self.keys
                buf[1][..., :old, :] = self.values
            self._ps_buffer = buf
        buf[0][..., old:new, :] = key_states
        buf[1][..., old:new, :] = value_states
        self.keys, self.values = buf[0][..., :new, :], buf[1][..., :new, :]
        self._ps_view = self.keys
        return self.keys, self.values

    cu.DynamicLayer.update = update
    try:
        yield
    finally:
        cu.DynamicLayer.update = original


def what_if(module: Any, ro: Any, args: argparse.Namespace, repeats: int = 3) -> dict[str, Any]:
    """CPU seconds of the last step's generation and training forward/backward, as run and with one change each.

    Generation (same prompts, same seeded sampler): as run (packed decode as the module sets it), on the
    module forward (`packed_decode=False`), and there with LoRA merged into the base weights (peft
    `merge_adapter` before, `unmerge_adapter` after, both inside the timing), the KV cache grown in place
    instead of by `torch.cat`, both. `same_tokens`: share of sampled tokens equal to the run as is.
    Training: forward + backward with LoRA dropout off (a hyperparameter change, not a free fix: it
    prices the dropout masks). Each variant runs `repeats` times interleaved; the best time counts.
    """
    import torch

    from anatomy_lightning.grpo import fast_path
    from anatomy_lightning.grpo.rollout import rollout_logprobs
    from anatomy_lightning.grpo.sequences import eval_mode, mask_vision_tokens

    policy, processor = module.policy, module.processor
    stop_ids = module.family.stop_token_ids(policy, processor)
    pad_id = processor.tokenizer.pad_token_id
    G, C = ro.group_size, args.new_tokens

    def generation(packed: bool | None, ctx: Any = contextlib.nullcontext) -> tuple[float, Any]:
        """CPU seconds of `sample_completions` (packed decode as set; under `ctx`, whose setup and teardown,
        e.g. merging, are included)."""
        gen = torch.Generator().manual_seed(0)
        with eval_mode(policy), torch.no_grad():
            t0 = time.thread_time()
            with ctx():
                ids = fast_path.sample_completions(policy, ro.prompts, G, C, stop_ids, pad_id, True, 1.0, 1.0, 0, C,
                                                   gen, packed_decode=packed)
            return time.thread_time() - t0, ids

    @contextlib.contextmanager
    def merged() -> Any:
        policy.merge_adapter()
        try:
            yield
        finally:
            policy.unmerge_adapter()

    @contextlib.contextmanager
    def both() -> Any:
        with merged(), kv_cache_in_place(C):
            yield

    gen_variants = {  # "as run": packed decode as the module sets it (auto: on for this float32 CPU model)
        "as run": (None, contextlib.nullcontext), "module forward": (False, contextlib.nullcontext),
        "module forward, LoRA merged": (False, merged),
        "module forward, KV cache grown in place": (False, lambda: kv_cache_in_place(C)),
        "module forward, both": (False, both),
    }
    if not hasattr(policy, "merge_adapter"):
        gen_variants = {k: v for k, v in gen_variants.items() if "merged" not in k and "both" not in k}
    times: dict[str, list[float]] = defaultdict(list)
    ids: dict[str, Any] = {}
    for _ in range(repeats):
        for name, (packed, ctx) in gen_variants.items():
            sec, out = generation(packed, ctx)
            times[name].append(sec)
            ids[name] = out
    base = ids["as run"]
    out: dict[str, Any] = {"generation": {
        name: {"seconds": min(ts), "all": ts, "saves": min(times["as run"]) - min(ts),
               "saves_median": sorted(times["as run"])[len(ts) // 2] - sorted(ts)[len(ts) // 2],
               "same_tokens": float((ids[name] == base).float().mean())}
        for name, ts in times.items()}}

    comp_in = mask_vision_tokens(ro.completion_ids, module.vision_ids, pad_id)
    was_training = policy.training
    policy.train()

    def train_pass() -> tuple[float, float]:
        t0 = time.thread_time()
        logp, _ = rollout_logprobs(policy, ro, comp_in, temperature=1.0, reuse_images=True, with_entropy=True)
        t1 = time.thread_time()
        (logp * ro.completion_mask).sum().backward()
        t2 = time.thread_time()
        policy.zero_grad(set_to_none=True)
        return t1 - t0, t2 - t1

    @contextlib.contextmanager
    def no_dropout() -> Any:
        saved = []
        for m in policy.modules():
            d = getattr(m, "lora_dropout", None)
            if d is not None and hasattr(d, "keys") and "default" in d:
                saved.append((d, d["default"]))
                d["default"] = torch.nn.Identity()
        try:
            yield
        finally:
            for d, old in saved:
                d["default"] = old

    train_variants = {"as run": contextlib.nullcontext, "LoRA dropout off": no_dropout}
    if not any(hasattr(m, "lora_dropout") for m in policy.modules()):  # full fine-tuning: nothing to switch off
        del train_variants["LoRA dropout off"]
    fwd: dict[str, list[float]] = defaultdict(list)
    bwd: dict[str, list[float]] = defaultdict(list)
    for _ in range(repeats):
        for name, ctx in train_variants.items():
            with ctx():
                f, b = train_pass()
            fwd[name].append(f)
            bwd[name].append(b)
    policy.train(was_training)
    out["training"] = {
        name: {"forward_seconds": min(fwd[name]), "backward_seconds": min(bwd[name]),
               "saves": min(fwd["as run"]) + min(bwd["as run"]) - min(fwd[name]) - min(bwd[name]),
               "forward_all": fwd[name], "backward_all": bwd[name]}
        for name in train_variants}
    out["repeats"] = repeats
    return out


# -- report ------------------------------------------------------------------------------------------------


def summarise(steps: list[dict[str, Any]], prof_split: dict[str, Any] | None, flops: dict[str, float],
              rates: dict[str, Any]) -> dict[str, Any]:
    """Mean per step over the steps without the profiler (or the profiled ones if there are none)."""

    def mean(sel: list[dict[str, Any]], key: str) -> dict[str, float]:
        acc = {k: 0.0 for k in ROW_KEYS}
        for s in sel:
            for k, v in rows_from_paths(s[key]).items():
                acc[k] += v / len(sel)
        return acc

    plain = [s for s in steps if not s["profiled"]]
    profiled = [s for s in steps if s["profiled"]]
    main = plain or profiled
    cpu, wall = mean(main, "paths_cpu"), mean(main, "paths_wall")
    step_cpu = sum(s["cpu"] for s in main) / len(main)
    step_wall = sum(s["wall"] for s in main) / len(main)
    thread_cpu = sum(cpu.values())
    wall["lightning"] += step_wall - sum(wall.values())  # outside every label (the clocks' own gaps: ~0)
    out_rows = []
    for key, group, desc in ROWS:
        f = flops.get(key, 0.0)
        rate = rates[FLOOR_RATE[key]] if key in FLOOR_RATE else None
        floor = f / (rate["hot_gflops_per_s"] * 1e9) if rate else 0.0
        floor_pass = f / (rate["gflops_per_s"] * 1e9) if rate else 0.0
        out_rows.append({
            "part": key, "group": group, "what": desc, "cpu_seconds": cpu[key], "wall_seconds": wall[key],
            "share": cpu[key] / thread_cpu, "gflop": f / 1e9, "floor_seconds": floor,
            "floor_seconds_model_pass": floor_pass, "x_floor": cpu[key] / floor if floor > 0 else None,
        })
    floor_total = sum(r["floor_seconds"] for r in out_rows)
    result = {
        "step_cpu_seconds": thread_cpu,
        "step_process_cpu_seconds": step_cpu,
        "step_wall_seconds": step_wall,
        "steps_timed": len(main),
        "all_steps": [{"wall": s["wall"], "cpu": s["cpu"], "profiled": s["profiled"]} for s in steps],
        "floor_seconds": floor_total,
        "floor_seconds_model_pass": sum(r["floor_seconds_model_pass"] for r in out_rows),
        "floor_seconds_best_rate": sum(flops.values()) / (rates["best_gflops_per_s"] * 1e9),
        "x_floor": thread_cpu / floor_total if floor_total else None,
        "total_gflop": sum(flops.values()) / 1e9,
        "rows": out_rows,
        "paths_cpu_seconds": {"/".join(p): v / len(main) for p, v in _sum_paths(main, "paths_cpu").items()},
        "calls_per_step": {"/".join(p): v / len(main) for p, v in _sum_paths(main, "calls").items()},
    }
    if profiled:
        pcpu = mean(profiled, "paths_cpu")
        result["profiled"] = {
            "step_cpu_seconds": sum(pcpu.values()),
            "step_wall_seconds": sum(s["wall"] for s in profiled) / len(profiled),
            "rows_cpu_seconds": pcpu, "by_operator_class": prof_split,
        }
    return result


def _sum_paths(sel: list[dict[str, Any]], key: str) -> dict[tuple[str, ...], float]:
    acc: dict[tuple[str, ...], float] = defaultdict(float)
    for s in sel:
        for p, v in s[key].items():
            acc[p] += v
    return dict(sorted(acc.items(), key=lambda kv: -kv[1]))


OP_CLASSES = ("gemm", "attention", "copy_alloc", "other_ops", "between_ops")


def markdown(result: dict[str, Any]) -> str:
    prof = result.get("profiled")
    head = "| group | part | CPU s/step | share | wall s/step | GFLOP | floor s | x floor | floor s (model pass) |"
    if prof:
        head += " GEMM / attn / copy+alloc / other ops / between ops (% of part, profiler) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in result["rows"]:
        cells = [r["group"], r["what"], f"{r['cpu_seconds']:.3f}", f"{100 * r['share']:.1f}%",
                 f"{r['wall_seconds']:.3f}", f"{r['gflop']:.1f}" if r["gflop"] else "-",
                 f"{r['floor_seconds']:.3f}" if r["gflop"] else "0",
                 f"{r['x_floor']:.1f}" if r["x_floor"] else "-",
                 f"{r['floor_seconds_model_pass']:.3f}" if r["gflop"] else "0"]
        if prof:
            c = (prof["by_operator_class"] or {}).get(r["part"], {}).get("by_class", {})
            total = sum(c.values())
            cells.append(" / ".join(f"{100 * c.get(k, 0.0) / total:.0f}" for k in OP_CLASSES) if total > 1e-3 else "")
        lines.append("| " + " | ".join(cells) + " |")
    tot = ["", "**step**", f"**{result['step_cpu_seconds']:.3f}**", "100%", f"{result['step_wall_seconds']:.3f}",
           f"{result['total_gflop']:.1f}", f"**{result['floor_seconds']:.3f}**", f"**{result['x_floor']:.1f}**",
           f"{result['floor_seconds_model_pass']:.3f}"]
    if prof:
        tot.append("")
    lines.append("| " + " | ".join(tot) + " |")
    if prof:  # the big parts per operator class, in the profiled step's CPU seconds (profiler overhead included)
        lines += ["", "| part | CPU s (no profiler) | CPU s (profiled) | GEMM | attention | copy+alloc | other ops | "
                      "between ops (Python, dispatch, profiler) | top-level ops/step |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in result["rows"]:
            split = (prof["by_operator_class"] or {}).get(r["part"], {})
            c = split.get("by_class", {})
            total, pcpu = sum(c.values()), prof["rows_cpu_seconds"][r["part"]]
            if r["cpu_seconds"] < 0.1 or total <= 0:
                continue
            lines.append(f"| {r['part']} | {r['cpu_seconds']:.3f} | {pcpu:.3f} | " + " | ".join(
                f"{pcpu * c.get(k, 0.0) / total:.3f}" for k in OP_CLASSES)
                + f" | {split.get('top_level_ops_per_step', 0):.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="profile_step-")
    workdir = Path(args.workdir or tmp.name)
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    steps, prof, info = run(args, workdir)
    run_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    split = profile_split(prof, args.profiled_steps) if prof is not None else None
    analysis_seconds = time.perf_counter() - t1
    tokens = info["tokens"]
    rates = gemm_rates(info["config"], tokens, args.gemm_repeats)
    flops = flop_counts(info["config"], tokens, info["lora"], args.beta, args.num_iterations,
                        grad_on_base=args.finetune == "full")
    result = summarise(steps, split, flops, rates)
    if args.what_if:
        t2 = time.perf_counter()
        result["what_if"] = what_if(info["module"], info["last_rollout"], args, args.what_if_repeats)
        result["what_if"]["seconds"] = time.perf_counter() - t2
    t = info["config"].text_config
    settings = {k: v for k, v in vars(args).items() if k not in ("workdir", "out")}
    settings.update(wrap_targets_missing=MISSING, load_average_1min_start=load0, load_average_1min_end=os.getloadavg()[0],
                    torch_threads=torch.get_num_threads(), run_seconds=run_seconds,
                    profile_analysis_seconds=analysis_seconds, torch=torch.__version__)
    report = {
        "settings": settings,
        "model": {"layers": t.num_hidden_layers, "hidden": t.hidden_size, "intermediate": t.intermediate_size,
                  "heads": t.num_attention_heads, "kv_heads": t.num_key_value_heads, "vocab": t.vocab_size,
                  "lora_linears": len(info["lora"]), "trainable_params": info["trainable_params"]},
        "tokens": tokens,
        "gemm_rates": rates,
        "flops": flops,
        **result,
    }
    print(f"\nGRPO step split, {settings}")
    print(f"tokens: prompts {tokens['prompt_tokens']} real of {tokens['prompt_padded']} padded "
          f"(image tokens {tokens['image_tokens']}), G={tokens['G']}, completion width {tokens['completion_width']}")
    print("GEMM rate, float32, 1 thread, model pass (hot single shape): " + ", ".join(
        f"{k} rows={rates[k]['rows']}: {rates[k]['gflops_per_s']:.1f} ({rates[k]['hot_gflops_per_s']:.1f}) GFLOP/s"
        for k in ("decode", "prefill", "train", "vision")) + f"; best hot shape {rates['best_gflops_per_s']:.1f} GFLOP/s")
    print(f"step: CPU {result['step_cpu_seconds']:.2f} s (process {result['step_process_cpu_seconds']:.2f} s), wall "
          f"{result['step_wall_seconds']:.2f} s, mean of {result['steps_timed']} step(s) without the profiler; floor "
          f"{result['floor_seconds']:.3f} s at the parts' hot GEMM rates ({result['floor_seconds_model_pass']:.3f} s at "
          f"the model-pass rates); step / floor = x{result['x_floor']:.1f}")
    print("all timed steps (CPU s / wall s): " + ", ".join(
        f"{s['cpu']:.2f}/{s['wall']:.2f}{' (profiled)' if s['profiled'] else ''}" for s in result["all_steps"]))
    if "profiled" in result:
        print(f"profiled step: CPU {result['profiled']['step_cpu_seconds']:.2f} s (profiler overhead included)")
    print()
    print(markdown(result))
    if "what_if" in result:
        w = result["what_if"]
        print(f"\nwhat if (last step's rollout, CPU seconds, best of {w['repeats']}; saves = seconds off that part):")
        for name, r in w["generation"].items():
            print(f"  generation, {name:<40} {r['seconds']:.3f} s  saves {r['saves']:+.3f} s  "
                  f"same tokens {100 * r['same_tokens']:.1f}%")
        for name, r in w["training"].items():
            print(f"  training pass, {name:<25} forward {r['forward_seconds']:.3f} s  backward "
                  f"{r['backward_seconds']:.3f} s  saves {r['saves']:+.3f} s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"\nwritten: {args.out}")
    if tmp is not None:
        tmp.cleanup()
    return report


if __name__ == "__main__":
    main()
