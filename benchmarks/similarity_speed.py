"""How long S(q) scoring takes: encoder load, then 100k questions with a cold and a warm cache.

    python benchmarks/similarity_speed.py [--n 100000] [--encoder PATH]

Two question sets: the synthetic scenes (18 anatomy names) and one drawn from a vocabulary of a
few hundred anatomy phrases with 2-6 options, which is closer to a real dataset's option list.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from collections.abc import Callable
from typing import Any, TypeVar

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from anatomy_lightning.data.schema import Question
from anatomy_lightning.data.similarity import SimilarityScorer, assign_stages
from anatomy_lightning.data.synthetic import SceneGenerator

STRUCTURES = (
    "liver",
    "liver lobe",
    "gallbladder",
    "gallbladder neck",
    "gallbladder fundus",
    "cystic duct",
    "cystic artery",
    "cystic plate",
    "common bile duct",
    "common hepatic duct",
    "hepatic artery",
    "portal vein",
    "omentum",
    "gut",
    "stomach",
    "duodenum",
    "diaphragm",
    "falciform ligament",
    "abdominal wall",
    "pancreas",
    "spleen",
    "kidney",
    "adrenal gland",
    "colon",
    "ileum",
    "jejunum",
    "appendix",
    "bladder",
    "ureter",
    "uterus",
    "ovary",
    "aorta",
    "vena cava",
    "mesentery",
    "peritoneum",
)
MODIFIERS = ("", "left", "right", "upper", "lower", "proximal", "distal", "anterior", "posterior", "inflamed", "fatty")

T = TypeVar("T")


def vocabulary_questions(n: int, seed: int = 0) -> list[Question]:
    """`n` questions over len(STRUCTURES) x len(MODIFIERS) (about 385) distinct option texts."""
    rng = random.Random(seed)
    vocab = [f"{m} {s}".strip() for s in STRUCTURES for m in MODIFIERS]
    out = []
    for i in range(n):
        options = rng.sample(vocab, rng.randint(2, 6))
        out.append(Question(f"v{i}", "Which structure is shown?", options, rng.randrange(len(options))))
    return out


def timed(label: str, fn: Callable[..., T], *args: Any) -> T:
    start = time.perf_counter()
    result = fn(*args)
    print(f"{label:<44}{time.perf_counter() - start:8.2f} s")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--encoder", default=None, help="default: the offline all-MiniLM-L6-v2")
    args = parser.parse_args()

    synthetic = timed(f"build {args.n} synthetic questions", SceneGenerator(seed=0).questions, args.n)
    vocab = timed(f"build {args.n} vocabulary questions", vocabulary_questions, args.n)
    with tempfile.TemporaryDirectory() as cache:
        probe = SimilarityScorer(args.encoder, cache_dir=cache)
        timed("load encoder (import + weights)", getattr, probe, "model")
        for name, questions in (("synthetic", synthetic), ("vocabulary", vocab)):
            texts = len({t for q in questions for t in q.options})
            cold = SimilarityScorer(args.encoder, cache_dir=cache)
            cold._model = probe.model  # time embedding + scoring, not a second load
            timed(f"{name} ({texts} texts): score, cold cache", cold.score, questions)
            warm = SimilarityScorer(args.encoder, cache_dir=cache)
            timed(f"{name}: score, warm cache (new scorer)", warm.score, questions)
            assert warm.model_loads == 0, "a warm cache must not load the encoder"
            timed(f"{name}: score again, in-memory", warm.score, questions)
            timed(f"{name}: assign_stages(K=3)", assign_stages, questions, 3)


if __name__ == "__main__":
    main()
