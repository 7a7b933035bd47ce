"""Pick a diverse subset of rewrites: maximal marginal relevance (MMR) over prompt embeddings.

GDQA wants rewrites that widen the policy's search, so a candidate scores well when it is far
from the original question (novelty) and far from the rewrites already picked (diversity):

    score(c) = lambda_ * (1 - sim(c, original)) - (1 - lambda_) * max_{s picked} sim(c, s)

Similarity is the cosine of sentence embeddings of the full prompt text (stem + options), or,
without an encoder, the token-set Jaccard overlap, so selection never needs a model.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np

from anatomy_lightning.data.schema import Question

__all__ = ["Embed", "jaccard_similarity", "prompt_text", "select_diverse", "similarity_matrix"]

Embed = Callable[[list[str]], np.ndarray]


def prompt_text(q: Question) -> str:
    """What the policy reads, minus the system text: stem and lettered options."""
    return f"{' '.join(q.question.split())}\n{q.options_block()}"


def _tokens(text: str) -> frozenset[str]:
    """Words and word bigrams: bigrams make reordered options ("A liver" -> "A gut") count."""
    words = re.findall(r"[a-z0-9_\-]+", text.lower())
    return frozenset(words) | frozenset(f"{a} {b}" for a, b in zip(words, words[1:]))


def jaccard_similarity(texts: list[str]) -> np.ndarray:
    """(n, n) Jaccard overlap of word+bigram sets; 1 on the diagonal."""
    sets = [_tokens(t) for t in texts]
    n = len(sets)
    sim = np.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            union = len(sets[i] | sets[j])
            sim[i, j] = sim[j, i] = len(sets[i] & sets[j]) / union if union else 1.0
    return sim


def similarity_matrix(texts: list[str], embed: Embed | None) -> np.ndarray:
    """Cosine similarity of embeddings (rows re-normalised, to be safe), or Jaccard without one."""
    if embed is None:
        return jaccard_similarity(texts)
    vectors = np.asarray(embed(texts), dtype=np.float64)
    if vectors.shape[0] != len(texts):
        raise ValueError(f"select_diverse: embed returned {vectors.shape[0]} rows for {len(texts)} texts")
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return vectors @ vectors.T


def select_diverse(
    candidates: list[Question],
    k: int,
    embed: Embed | None,
    lambda_: float = 0.5,
    reference: Question | None = None,
) -> list[Question]:
    """Up to k candidates chosen greedily by MMR; exact duplicate prompts count once.

    Ties go to the earlier candidate, so the choice is deterministic for a given candidate order.
    """
    if not 0.0 <= lambda_ <= 1.0:
        raise ValueError(f"select_diverse: lambda_ must be in [0, 1], got {lambda_}")
    unique: dict[str, Question] = {}
    for c in candidates:
        unique.setdefault(prompt_text(c), c)
    if reference is not None:
        unique.pop(prompt_text(reference), None)  # a 'rewrite' identical to the original adds nothing
    pool = list(unique.values())
    if k <= 0 or not pool:
        return []
    texts = [prompt_text(c) for c in pool] + ([prompt_text(reference)] if reference is not None else [])
    sim = similarity_matrix(texts, embed)
    n = len(pool)
    novelty = 1.0 - sim[:n, n] if reference is not None else np.zeros(n)
    chosen: list[int] = []
    redundancy = np.zeros(n)  # max similarity to anything chosen so far
    while len(chosen) < min(k, n):
        score = lambda_ * novelty - (1.0 - lambda_) * redundancy
        score[chosen] = -np.inf
        best = int(np.argmax(score))  # first maximum: earliest candidate wins ties
        chosen.append(best)
        redundancy = np.maximum(redundancy, sim[:n, best])
    return [pool[i] for i in chosen]
