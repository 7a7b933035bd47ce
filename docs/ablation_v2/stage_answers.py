"""What the policies answer on the look-alike questions: gold, a look-alike kin of the gold, another
option, or a name not among the options; per arm, from the ablation's predictions.

    python docs/ablation_v2/stage_answers.py outputs/ablation_v2 [--stage 2]

Reads `<out>/predictions/ablation_<arm>_s<seed>.jsonl` (fields `options`, `gold`, `anatomy`, `stage`,
`completion`) and the look-alike groups of benchmark v2 (`V2_LOOKALIKE_GROUPS`).
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

from anatomy_lightning.data.synthetic import V2_LOOKALIKE_GROUPS

ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)


def kind(row: dict) -> str:
    found = ANSWER.search(row["completion"] or "")
    said = (found.group(1) if found else "").strip().lower()
    gold = row["anatomy"]
    kin = next((set(g) - {gold} for g in V2_LOOKALIKE_GROUPS if gold in g), set())
    options = {o.lower(): o for o in row["options"]}
    if said == gold.lower():
        return "gold"
    if said in {k.lower() for k in kin}:  # v2 puts every kin that fits among the options
        return "look-alike kin"
    if said in options:
        return "other option"
    return "not an option"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--stage", type=int, default=2)
    args = parser.parse_args()
    counts: dict[str, Counter] = defaultdict(Counter)
    for path in sorted((args.out / "predictions").glob("ablation_*_s*.jsonl")):
        arm = re.match(r"ablation_(.+)_s\d+$", path.stem).group(1)
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row.get("stage") == args.stage:
                counts[arm][kind(row)] += 1
    kinds = ["gold", "look-alike kin", "other option", "not an option"]
    print(f"stage {args.stage}: share of answers (all seeds pooled)\n")
    print("| arm | n | " + " | ".join(kinds) + " |")
    print("|---|---|" + "---|" * len(kinds))
    for arm in ("grpo", "curriculum", "augmentation", "both", "dynamic"):
        c = counts.get(arm)
        if c:
            n = sum(c.values())
            print(f"| {arm} | {n} | " + " | ".join(f"{c[k] / n:.2f}" for k in kinds) + " |")


if __name__ == "__main__":
    main()
