"""What the policies answer on benchmark v3, by question kind: the gold, its twin, another option, or
a name that is not among the options.

    python docs/ablation_v3/answer_breakdown.py outputs/ablation_v3 [--json docs/ablation_v3/answer_breakdown.json]

Reads the ablation runner's per-question predictions (`<out>/predictions/*.jsonl`) and the test split
(`<out>/synthetic/test.jsonl`, whose metadata says whether the frame is hard: ambiguous view, twin
among the options). Prints, per arm (mean over its seeds) and for the warm start, the share of each
answer kind on easy and on hard questions.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

from anatomy_lightning.data.synthetic import V3_ANATOMIES

KINDS = ("gold", "twin", "other option", "not an option")
TWIN = {a.name: b.name for a in V3_ANATOMIES for b in V3_ANATOMIES if a.family == b.family and a.name != b.name}


def answer_of(completion: str) -> str | None:
    m = re.search(r"<answer>(.*?)</answer>", completion or "", re.S)
    return m.group(1).strip() if m else None


def kind_of(answer: str | None, gold: str, options: list[str]) -> str:
    if answer == gold:
        return "gold"
    if answer == TWIN.get(gold):
        return "twin"
    return "other option" if answer in options else "not an option"


def breakdown(pred_file: Path, test: dict[str, dict]) -> dict[str, dict[str, float]]:
    counts: dict[str, Counter] = defaultdict(Counter)
    for line in pred_file.read_text().splitlines():
        row = json.loads(line)
        q = test[row["id"]]
        level = "hard" if q["metadata"]["hard_distractors"] else "easy"
        gold = q["options"]["ABCDEF".index(q["answer"])]
        counts[level][kind_of(answer_of(row.get("completion", "")), gold, q["options"])] += 1
    return {lvl: {k: c[k] / max(1, sum(c.values())) for k in KINDS} for lvl, c in sorted(counts.items())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    test = {q["id"]: q for q in map(json.loads, (args.out / "synthetic" / "test.jsonl").read_text().splitlines())}
    per_arm: dict[str, list[dict]] = defaultdict(list)
    for f in sorted((args.out / "predictions").glob("*.jsonl")):
        arm = "warm start" if f.stem == "baseline" else re.sub(r"^ablation_(.*)_s\d+$", r"\1", f.stem)
        per_arm[arm].append(breakdown(f, test))
    table = {}
    print(f"{'arm':<14} {'questions':<9} " + " ".join(f"{k:>14}" for k in KINDS))
    for arm, runs in per_arm.items():
        table[arm] = {}
        for level in ("easy", "hard"):
            mean = {k: sum(r[level][k] for r in runs) / len(runs) for k in KINDS}
            table[arm][level] = mean
            print(f"{arm:<14} {level:<9} " + " ".join(f"{mean[k]:>14.3f}" for k in KINDS))
    if args.json:
        args.json.write_text(json.dumps(table, indent=1) + "\n")


if __name__ == "__main__":
    main()
