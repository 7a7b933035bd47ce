"""GRPO step speed and peak memory of this project versus TRL's `GRPOTrainer`, on equal terms.

    pip install -r benchmarks/requirements.txt          # TRL is a benchmark-only dependency
    python benchmarks/trl_speed.py                      # CPU: the ~30M-parameter "small" Qwen2.5-VL
    python benchmarks/trl_speed.py --model 3b --device cuda --image-size 448 --new-tokens 256

Held equal for both systems: the model weights (one random-weight checkpoint written once, loaded
by both), the synthetic questions and images, the prompt text (system prompt + chat template), G,
prompts per step, the completion length (`--fixed-length`, on by default: no end-of-turn token
before `--new-tokens`, so every completion has exactly that many tokens), precision (fp32 on CPU,
bf16 on GPU), torch threads, LoRA settings (or full fine-tuning), optimiser (AdamW), learning rate,
loss type ("grpo"), beta = 0 (no reference model) and mu = 1 (no old-policy forward), and the
reward functions (accuracy + 0.5 format).

Each system runs in its own subprocess, so imports, caches and memory peaks do not mix. A step is
timed from the end of the previous optimiser step to the end of this one (generation, rewards,
log-prob forwards, backward, optimiser and the framework's own overhead, data loading included),
after one warm-up step; wall and process CPU time are both recorded (on a shared CPU the CPU time
is the steadier figure; `--rounds` alternates the systems to even out the machine's load).
Peak memory: GPU, `torch.cuda.max_memory_allocated` over the timed steps; CPU, the process's
resident-set high-water mark over the timed steps (Linux `VmHWM`, reset after the warm-up step).
The growth above the resident set at that moment is printed too, but the allocator keeps what
the warm-up step freed, so the peak itself is the figure to compare. Prints a table, writes JSON.

Measured results are in benchmarks/results/ (the settings and the machine's load are in each file).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SYSTEMS = ("anatomy_lightning", "trl", "anatomy_lightning_module_decode")
DEFAULT_SYSTEMS = SYSTEMS[:2]  # the third: this project with `packed_decode: false` (decode on the module forward)
SIZES = {"tiny": "tiny", "small": "small", "3b": "3b", "7b": "7b"}
REWARD_WEIGHTS = {"accuracy": 1.0, "format": 0.5}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", choices=sorted(SIZES), default="small", help="built-in architecture, random weights")
    p.add_argument("--steps", type=int, default=3, help="timed GRPO steps (after one warm-up step)")
    p.add_argument("--G", type=int, default=8, help="completions per prompt")
    p.add_argument("--new-tokens", type=int, default=64, help="completion length (max_new_tokens)")
    p.add_argument("--prompts-per-step", type=int, default=2, help="prompts per optimiser step (N); B = N * G")
    p.add_argument("--image-size", type=int, default=224, help="synthetic image side in px (224: 64 image tokens)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for both (1 by default: on a shared CPU, OpenMP threads that wait for a "
                        "descheduled sibling make small matmuls 10-30x slower, which would measure the machine)")
    p.add_argument("--finetune", choices=("lora", "full"), default="lora")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--fixed-length", action=argparse.BooleanOptionalAction, default=True,
                   help="force exactly --new-tokens tokens per completion in both systems")
    p.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                   help="comma-separated subset of " + ",".join(SYSTEMS) + " (the last: this project decoding on its "
                        "module forward, model.packed_decode=false, for a before/after of that change in one run)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the systems alternately this many times and pool the timed steps "
                        "(evens out a busy machine)")
    p.add_argument("--workdir", default=None, help="where the checkpoint and data go (default: a temp folder)")
    p.add_argument("--out", default="benchmarks/results/trl_speed.json", help="JSON results ('' = do not write)")
    p.add_argument("--worker", choices=SYSTEMS, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    minimums = {"steps": 1, "G": 2, "new_tokens": 1, "prompts_per_step": 1, "threads": 1, "rounds": 1}
    problems = [f"--{k.replace('_', '-')}={getattr(args, k)} must be >= {lo}"
                for k, lo in minimums.items() if getattr(args, k) < lo]
    unknown = set(args.systems.split(",")) - set(SYSTEMS)
    if unknown:
        problems.append(f"--systems has {sorted(unknown)}; use a subset of {list(SYSTEMS)}")
    if problems:
        p.error("; ".join(problems))
    return args


# -- shared inputs ---------------------------------------------------------------------------------


def prepare_inputs(args: argparse.Namespace, workdir: Path) -> tuple[Path, Path]:
    """Write the random-weight checkpoint and the synthetic questions once; both systems read them."""
    import torch

    from anatomy_lightning.data.synthetic import write_synthetic_split
    from anatomy_lightning.models.tiny import build_tiny_checkpoint

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    folder = workdir / f"model-{args.model}-{str(dtype).removeprefix('torch.')}"
    model_dir = build_tiny_checkpoint(folder, size=SIZES[args.model], dtype=dtype)
    n = args.prompts_per_step * (args.steps + 1)
    data = write_synthetic_split(workdir / f"data-{args.image_size}", n, seed=0, image_size=args.image_size)
    return model_dir, data


def load_benchmark_questions(data: Path) -> list[Any]:
    from anatomy_lightning.data.loader import load_questions

    return load_questions(data).questions


# -- measurement -----------------------------------------------------------------------------------


class StepClock:
    """Wall and CPU time at the end of every optimiser step, memory peak from the end of the warm-up.

    CPU time (this process, all threads) is the figure to compare on a shared CPU: other jobs on
    the machine stretch the wall time of whichever system happens to run beside them, not the
    work a step does. On a GPU the wall time is the figure.
    """

    def __init__(self, device: str) -> None:
        self.device, self.ends, self.cpu_ends, self.tokens = device, [], [], []
        self.rss_at_start_mb = 0.0

    def step_end(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())
        if len(self.ends) == 1:  # warm-up done: the memory peak counts from here
            self.rss_at_start_mb = _rss_mb()
            _reset_peak()

    def result(self) -> dict[str, Any]:
        steps = [b - a for a, b in zip(self.ends, self.ends[1:])]
        cpu = [b - a for a, b in zip(self.cpu_ends, self.cpu_ends[1:])]
        tokens = self.tokens[1 : len(self.ends)]  # the timed steps' completions
        out: dict[str, Any] = {
            "step_seconds": steps,
            "step_cpu_seconds": cpu,
            "seconds_per_step": sum(steps) / max(1, len(steps)),
            "median_seconds_per_step": sorted(steps)[len(steps) // 2] if steps else float("nan"),
            "cpu_seconds_per_step": sum(cpu) / max(1, len(cpu)),
            "tokens_per_step": sum(tokens) / max(1, len(tokens)),
        }
        out["tokens_per_second"] = out["tokens_per_step"] / max(1e-9, out["seconds_per_step"])
        out.update(_peak())
        out["rss_at_start_mb"] = self.rss_at_start_mb
        if "peak_rss_mb" in out:
            out["peak_rss_above_start_mb"] = out["peak_rss_mb"] - self.rss_at_start_mb
        return out


def _rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:  # Linux >= 4.0: "5" resets the resident-set high-water mark (VmHWM, ru_maxrss)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak() -> dict[str, float]:
    import resource

    import torch

    out = {}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_gpu_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["peak_gpu_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20
    hwm = 0.0
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) / 1024
    except OSError:
        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["peak_rss_mb"] = hwm
    return out


# -- the two systems -------------------------------------------------------------------------------


def run_anatomy_lightning(
    args: argparse.Namespace, model_dir: Path, data: Path, workdir: Path, packed_decode: bool | None = None
) -> dict[str, Any]:
    """`GRPOModule` under a Lightning `Trainer`, exactly as `fit` runs it (manual optimisation)."""
    import lightning as L
    from torch.utils.data import DataLoader

    from anatomy_lightning.models.loading import LoraSettings
    from anatomy_lightning.module import GRPOModule

    clock = StepClock(args.device)

    class CountingModule(GRPOModule):
        def configure_model(self) -> None:  # count the completion tokens of every rollout
            super().configure_model()
            sample = self.rollouts.sample

            def counted(*a: Any, **kw: Any) -> Any:
                ro = sample(*a, **kw)
                clock.tokens.append(int(ro.completion_mask.sum()))
                return ro

            self.rollouts.sample = counted  # type: ignore[method-assign]

    class Clock(L.Callback):
        def on_train_batch_end(self, *_: Any) -> None:
            clock.step_end()

    L.seed_everything(0, workers=True, verbose=False)
    module = CountingModule(
        model=str(model_dir),
        dtype="bfloat16" if args.device == "cuda" else "float32",
        lora=LoraSettings() if args.finetune == "lora" else None,
        gradient_checkpointing=args.gradient_checkpointing,
        num_generations=args.G,
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens if args.fixed_length else 0,
        rewards=dict(REWARD_WEIGHTS),
        loss_type="grpo",
        beta=0.0,
        num_iterations=1,
        learning_rate=1e-5,
        optimizer="adamw",
        packed_decode=packed_decode,
    )
    trainer = L.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        precision="bf16-true" if args.device == "cuda" else "32-true",
        max_steps=args.steps + 1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(workdir / "anatomy_lightning"),
        callbacks=[Clock()],
    )
    loader = DataLoader(load_benchmark_questions(data), batch_size=args.prompts_per_step, shuffle=True, collate_fn=list)
    trainer.fit(module, loader)
    return clock.result()


def run_trl(args: argparse.Namespace, model_dir: Path, data: Path, workdir: Path) -> dict[str, Any]:
    """TRL's `GRPOTrainer` on the same checkpoint, prompts, images and settings."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from anatomy_lightning.data.images import load_image
    from anatomy_lightning.grpo.rewards import accuracy_reward, format_reward
    from anatomy_lightning.grpo.prompts import DEFAULT_SYSTEM_PROMPT, render_prompt
    from anatomy_lightning.models.families import family_for_type
    from anatomy_lightning.models.loading import LoraSettings

    clock = StepClock(args.device)
    questions = {q.id: q for q in load_benchmark_questions(data)}

    def _texts(completions: list[Any]) -> list[str]:
        return [c[-1]["content"] if isinstance(c, list) else c for c in completions]

    def accuracy(completions: list[Any], qid: list[str], completion_ids: list[list[int]], **_: Any) -> list[float]:
        clock.tokens.append(sum(len(ids) for ids in completion_ids))  # the first reward function sees every step once
        return accuracy_reward(_texts(completions), [questions[i] for i in qid])

    def answer_format(completions: list[Any], qid: list[str], **_: Any) -> list[float]:
        return format_reward(_texts(completions), [questions[i] for i in qid])

    class Clock(TrainerCallback):
        def on_step_end(self, *_: Any, **__: Any) -> None:
            clock.step_end()

    # the prompt text is ours: system prompt + rendered question; TRL puts the image before the user text,
    # as `build_messages` does, so the chat template gives the same tokens
    rows = [
        {
            "prompt": [
                {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                {"role": "user", "content": render_prompt(q)},
            ],
            "image": load_image(q.images[0]),
            "qid": q.id,
        }
        for q in questions.values()
    ]
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype)
    if args.device == "cuda":
        model = model.to("cuda")
    processor = AutoProcessor.from_pretrained(model_dir)
    processor.tokenizer.padding_side = "left"
    config = GRPOConfig(
        output_dir=str(workdir / "trl"),
        per_device_train_batch_size=args.prompts_per_step * args.G,
        gradient_accumulation_steps=1,
        num_generations=args.G,
        max_completion_length=args.new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        generation_kwargs={"min_new_tokens": args.new_tokens} if args.fixed_length else None,
        beta=0.0,
        num_iterations=1,
        loss_type="grpo",
        scale_rewards="group",
        epsilon=0.2,
        reward_weights=list(REWARD_WEIGHTS.values()),
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        gradient_checkpointing=args.gradient_checkpointing,
        max_steps=args.steps + 1,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=args.device == "cpu",
        bf16=args.device == "cuda",
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[accuracy, answer_format],
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=processor,
        peft_config=LoraSettings().to_peft(family_for_type("qwen2_5_vl")) if args.finetune == "lora" else None,
        callbacks=[Clock()],
    )
    trainer.train()
    return clock.result()


RUNNERS = {
    "anatomy_lightning": run_anatomy_lightning,
    "trl": run_trl,
    "anatomy_lightning_module_decode": lambda *a: run_anatomy_lightning(*a, packed_decode=False),
}


def worker(args: argparse.Namespace) -> None:
    """One system in this process; prints its result as the last line of stdout (JSON)."""
    import torch

    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    model_dir, data = prepare_inputs(args, workdir)  # already written by the parent: only checked here
    result = RUNNERS[args.worker](args, model_dir, data, workdir)
    result.update(system=args.worker, torch_threads=torch.get_num_threads())
    print("RESULT " + json.dumps(result), flush=True)


def _without_workdir(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--workdir":
            skip = True
        elif not a.startswith("--workdir="):
            out.append(a)
    return out


def run_in_subprocess(system: str, argv: list[str], workdir: Path, threads: int) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", system, "--workdir", str(workdir)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        raise RuntimeError(f"{system} worker failed (exit {proc.returncode}):\n{tail}")
    return json.loads(lines[-1].removeprefix("RESULT "))


# -- report ----------------------------------------------------------------------------------------


def pool_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from several runs of a system: timed steps pooled, memory peaks the highest seen."""
    if len(rounds) == 1:
        return rounds[0]
    steps = [s for r in rounds for s in r["step_seconds"]]
    cpu = [s for r in rounds for s in r["step_cpu_seconds"]]
    tokens = sum(r["tokens_per_step"] * len(r["step_seconds"]) for r in rounds) / len(steps)
    out = dict(rounds[0], step_seconds=steps, step_cpu_seconds=cpu, tokens_per_step=tokens, rounds=len(rounds))
    out["seconds_per_step"] = sum(steps) / len(steps)
    out["cpu_seconds_per_step"] = sum(cpu) / len(cpu)
    out["median_seconds_per_step"] = sorted(steps)[len(steps) // 2]
    out["tokens_per_second"] = tokens / out["seconds_per_step"]
    for key in rounds[0]:
        if key.startswith("peak_") or key == "rss_at_start_mb":
            out[key] = max(r[key] for r in rounds)
    return out


def summarize(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Ratios of this project to TRL: steps per second (> 1 is faster) and peak memory (< 1 is less)."""
    ours, trl = results.get("anatomy_lightning"), results.get("trl")
    if not ours or not trl:
        return {}
    ratios = {"steps_per_second": trl["seconds_per_step"] / ours["seconds_per_step"],
              "tokens_per_second": ours["tokens_per_second"] / trl["tokens_per_second"]}
    if ours.get("cpu_seconds_per_step") and trl.get("cpu_seconds_per_step"):
        ratios["steps_per_cpu_second"] = trl["cpu_seconds_per_step"] / ours["cpu_seconds_per_step"]
    for key in ("peak_gpu_allocated_mb", "peak_rss_mb", "peak_rss_above_start_mb"):
        if key in ours and key in trl and trl[key] > 0:
            ratios[key] = ours[key] / trl[key]
    before = results.get("anatomy_lightning_module_decode")
    if before:  # packed decode against the module forward, same run
        ratios["steps_per_second_vs_module_decode"] = before["seconds_per_step"] / ours["seconds_per_step"]
        ratios["steps_per_cpu_second_vs_module_decode"] = (before["cpu_seconds_per_step"]
                                                           / ours["cpu_seconds_per_step"])
    return ratios


def format_table(results: dict[str, dict[str, Any]], ratios: dict[str, float]) -> str:
    """Per-system figures, then a row of ratios: speed = TRL / ours (higher is better), memory = ours / TRL."""
    gpu = any("peak_gpu_allocated_mb" in r for r in results.values())
    cols = [  # (result key, header, format, ratio key)
        ("seconds_per_step", "s/step", "{:.2f}", "steps_per_second"),
        ("cpu_seconds_per_step", "CPU s/step", "{:.2f}", "steps_per_cpu_second"),
        ("tokens_per_second", "gen tok/s", "{:.1f}", "tokens_per_second"),
        ("tokens_per_step", "tok/step", "{:.0f}", None),
    ]
    if gpu:
        cols.append(("peak_gpu_allocated_mb", "peak GPU MB", "{:.0f}", "peak_gpu_allocated_mb"))
    else:
        cols += [("peak_rss_mb", "peak RSS MB", "{:.0f}", "peak_rss_mb"),
                 ("peak_rss_above_start_mb", "above start MB", "{:.0f}", "peak_rss_above_start_mb")]
    lines = [f"{'system':<32}" + "".join(f"{h:>16}" for _, h, _, _ in cols)]
    for name, r in results.items():
        lines.append(f"{name:<32}" + "".join(f"{fmt.format(r.get(k, float('nan'))):>16}" for k, _, fmt, _ in cols))
    if ratios:
        cells = [f"x{ratios[rk]:.2f}" if rk in ratios else "" for _, _, _, rk in cols]
        lines.append(f"{'ours vs trl':<32}" + "".join(f"{c:>16}" for c in cells))
        if "steps_per_second_vs_module_decode" in ratios:
            lines.append(f"{'ours vs module decode':<32}{'x%.2f' % ratios['steps_per_second_vs_module_decode']:>16}"
                         f"{'x%.2f' % ratios['steps_per_cpu_second_vs_module_decode']:>16}")
        lines.append("(time and tok/s columns: TRL time / ours, higher is faster; memory columns: ours / TRL)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="trl_speed-")
    workdir = Path(args.workdir or tmp.name)
    t0 = time.perf_counter()
    prepare_inputs(args, workdir)
    print(f"inputs ready in {time.perf_counter() - t0:.1f} s ({workdir})", flush=True)
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in args.systems.split(",")}
    for r in range(args.rounds):
        for system, done in runs.items():
            t0 = time.perf_counter()
            done.append(run_in_subprocess(system, _without_workdir(argv), workdir, args.threads))
            print(f"round {r + 1}/{args.rounds} {system}: {done[-1]['seconds_per_step']:.2f} s/step "
                  f"(run took {time.perf_counter() - t0:.1f} s)", flush=True)
    results = {system: pool_rounds(rs) for system, rs in runs.items()}
    ratios = summarize(results)
    settings = {k: v for k, v in vars(args).items() if k not in ("worker", "workdir", "out")}
    settings["load_average_1min"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"\nGRPO step, {settings}\n" + format_table(results, ratios))
    report = {"settings": settings, "results": results, "ours_over_trl": ratios}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"written: {args.out}")
    if tmp is not None:
        tmp.cleanup()
    return report


if __name__ == "__main__":
    main()
