"""Rule-based question rewriters for Group Diversity Question Augmentation (GDQA).

A rewriter turns one hard question into a few new ones. The informative ones (the defaults)
change what is asked so an all-wrong group can get reward spread: `eliminate_options` drops the
distractors farthest from the gold, `contrast_cue` adds a hint ruling out the gold's nearest
distractor. The others ask the same thing from another angle (a paraphrased stem, an inverted
spatial relation, reordered options, another answer form); measured at equal compute they did not
help (docs: DESIGN.md, GDQA). Every rewrite keeps the image and the gold option text, so the reward
functions (which check the letter or the option text) stay valid. All randomness comes from the `random.Random` passed in,
so a seeded augmenter makes the same rewrites on every rank and after a resume.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from anatomy_lightning.augment.stem import ParsedStem, parse_stem, same_stem
from anatomy_lightning.data.prompts import PIN_KEY
from anatomy_lightning.data.schema import Question

__all__ = [
    "AnswerForm",
    "ContrastCue",
    "EliminateOptions",
    "InvertRelation",
    "OptionEmbed",
    "ShuffleOptions",
    "TemplateParaphrase",
    "derive",
    "distractors_by_nearness",
]


def derive(
    orig: Question,
    k: int,
    rewriter: str,
    *,
    question: str | None = None,
    options: Sequence[str] | None = None,
    answer_index: int | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Question:
    """A rewrite of `orig`: same images, stage and S(q); marked so it is never rewritten again.

    `k` is provisional (the rewriter's own count); the augmenter re-numbers ids so they stay
    unique over a run. Chained rewrites point back to the root question.
    """
    root = str(orig.metadata.get("augmented_from", orig.id))
    meta = {**orig.metadata, **(metadata or {}), "augmented_from": root, "rewriter": rewriter, "augmented": True}
    meta.pop(PIN_KEY, None)  # the dataset's prompt shows the original question: a rewrite uses the template
    return Question(
        id=f"{root}#aug{k}-{rewriter}",
        question=orig.question if question is None else question,
        options=list(orig.options if options is None else options),
        answer_index=orig.answer_index if answer_index is None else answer_index,
        images=list(orig.images),
        metadata=meta,
        similarity=orig.similarity,
        stage=orig.stage,
    )


# relation R(target, ref) read from the reference's side: R'(ref, target)
_INVERSE: dict[str, str] = {
    "left": "is to the right of",
    "right": "is to the left of",
    "above": "is below",
    "below": "is above",
    "within": "contains",
    "horizontal": "is horizontally aligned with",
    "vertical": "is vertically aligned with",
    "retracted_by": "retracts",
    "coagulated_by": "coagulates",
}


def _a(noun_phrase: str) -> str:
    return f"{'an' if noun_phrase[:1] in 'aeiou' else 'a'} {noun_phrase}"


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _describe(p: ParsedStem) -> str:
    """The answer as a noun phrase: 'the anatomy at the top-left of the frame'."""
    if p.kind == "position":
        return f"the anatomy at the {p.position} of the frame"
    if p.kind == "relation":
        return f"the {p.target} that is {' and '.join(c.render() for c in p.clauses)}"
    if p.kind == "attribute":
        return f"the {p.target}"
    return f"the correct answer to the question '{p.text.strip()}'"


def _pos_words(pos: str, rng: random.Random) -> str:
    """'top-left' or an equivalent spelling ('upper left'), for surface variety."""
    if pos in ("center", "centre") or rng.random() < 0.5:
        return pos
    swap = {"top": "upper", "bottom": "lower", "mid": "middle"}
    return " ".join(swap.get(w, w) for w in pos.split("-"))


def _pick(texts: list[str], orig: str, n: int, rng: random.Random) -> list[str]:
    """Up to n distinct texts that differ from the original, chosen with `rng`."""
    unique = [t for t in dict.fromkeys(texts) if not same_stem(t, orig)]
    return rng.sample(unique, min(n, len(unique)))


class TemplateParaphrase:
    """Re-emits a parsed stem in other templates; unknown stems get generic rewordings."""

    name = "template_paraphrase"

    def __init__(self, num_variants: int = 2) -> None:
        self.num_variants = num_variants

    def candidates(self, p: ParsedStem, rng: random.Random) -> list[str]:
        if p.kind == "position":
            pos = _pos_words(p.position or "", rng)
            return [
                f"Which anatomy is located at the {pos} of the frame?",
                f"What anatomical structure appears in the {pos} region of the image?",
                f"Looking at the {pos} part of the image, which anatomy do you see?",
                f"In the {pos} area of the frame, what anatomy is visible?",
                f"What is the name of the anatomy at the {pos} of the frame?",
            ]
        if p.kind == "relation":
            order = list(p.clauses)
            if len(order) > 1 and rng.random() < 0.5:
                order.reverse()  # the clauses are a conjunction: their order is free
            rel = " and ".join(c.render(rng) for c in order)
            both = f"both {rel}" if len(order) == 2 else rel
            return [
                f"What is the name of the {p.target} that is {both}?",
                f"Which {p.target} is {rel}?",
                f"There is {_a(p.target)} that is {both}; what is its name?",
                f"{_cap(rel)}, which {p.target} can be seen?",
                f"Can you name the {p.target} that is {rel}?",
            ]
        if p.kind == "attribute":
            desc = p.target.removesuffix(" anatomy")
            return [
                f"Which anatomy is the {desc} one?",
                f"There is {_a(p.target)}; what is its name?",
                f"What is the name of the {p.target}?",
                f"Which {p.target} is shown in the image?",
            ]
        stem = " ".join(p.text.split()).rstrip("?").strip()
        noun = "anatomy" if re.search(r"anatom|organ|structure|tissue", stem, re.I) else "option"
        low = stem[:1].lower() + stem[1:]
        return [
            f"Which {noun} matches this description: {low}?",
            f"Based on the image, {low}?",
            f"Looking carefully at the image, {low}?",
        ]

    def __call__(self, q: Question, rng: random.Random) -> list[Question]:
        texts = _pick(self.candidates(parse_stem(q.question), rng), q.question, self.num_variants, rng)
        return [derive(q, k, self.name, question=t) for k, t in enumerate(texts)]


def _opposite(pos: str) -> str | None:
    flip = {"top": "bottom", "bottom": "top", "left": "right", "right": "left", "mid": "mid"}
    parts = pos.split("-")
    if len(parts) != 2 or not all(w in flip for w in parts):
        return None
    return "-".join(flip[w] for w in parts)


class InvertRelation:
    """'the anatomy left of the X' -> 'The X is to the right of which anatomy?'.

    Only stems that parse as a relation (one clause inverted, the rest kept as a condition) or as
    a frame position (read from the position's side, or against the opposite position).
    """

    name = "invert_relation"

    def __init__(self, num_variants: int = 2) -> None:
        self.num_variants = num_variants

    def candidates(self, p: ParsedStem) -> list[str]:
        if p.kind == "position" and p.position:
            out = [f"The {p.position} of the frame shows which anatomy?"]
            if opp := _opposite(p.position):
                out.append(f"Opposite the {opp} of the frame, at the {p.position}, which anatomy is there?")
            return out
        if p.kind != "relation":
            return []
        out = []
        for i, c in enumerate(p.clauses):
            if c.relation not in _INVERSE:
                continue
            head = f"The {c.reference} {_INVERSE[c.relation]} which {p.target}"
            rest = [o.render() for j, o in enumerate(p.clauses) if j != i]
            out.append(f"{head}, the one that is also {' and '.join(rest)}?" if rest else f"{head}?")
        return out

    def __call__(self, q: Question, rng: random.Random) -> list[Question]:
        texts = _pick(self.candidates(parse_stem(q.question)), q.question, self.num_variants, rng)
        return [derive(q, k, self.name, question=t) for k, t in enumerate(texts)]


class ShuffleOptions:
    """Reorders the options (never the identical order); the gold index follows its text."""

    name = "shuffle_options"

    def __init__(self, num_variants: int = 1) -> None:
        self.num_variants = num_variants

    def __call__(self, q: Question, rng: random.Random) -> list[Question]:
        n = len(q.options)
        identity = tuple(range(n))
        if n < 2:
            return []
        if n <= 4:  # few enough to list: sample distinct non-identity orders directly
            perms = [p for p in itertools.permutations(range(n)) if p != identity]
            chosen = rng.sample(perms, min(self.num_variants, len(perms)))
        else:
            seen: set[tuple[int, ...]] = set()
            chosen = []
            while len(chosen) < self.num_variants:
                order = list(identity)
                rng.shuffle(order)
                perm = tuple(order)
                if perm != identity and perm not in seen:
                    seen.add(perm)
                    chosen.append(perm)
        return [
            derive(q, k, self.name, options=[q.options[i] for i in perm], answer_index=perm.index(q.answer_index))
            for k, perm in enumerate(chosen)
        ]


class AnswerForm:
    """Asks for the answer in another form; the answer stays a choice among the same options.

    forms: "text" (answer with the option text, not the letter), "which_of_following"
    ("Which of the following is the anatomy ...?"), "fill_blank" ("The anatomy ... is ____.").
    """

    name = "answer_form"
    FORMS = ("text", "which_of_following", "fill_blank")

    def __init__(self, forms: Sequence[str] = FORMS, num_variants: int = 1) -> None:
        unknown = [f for f in forms if f not in self.FORMS]
        if unknown:
            raise ValueError(f"answer_form: unknown forms {unknown}; choose from {list(self.FORMS)}")
        self.forms, self.num_variants = list(forms), num_variants

    def render(self, form: str, q: Question) -> str:
        stem = " ".join(q.question.split()).replace(" ?", "?")
        if form == "text":
            return f"{stem} Answer with the text of the correct option, not its letter."
        described = _describe(parse_stem(q.question))
        if form == "which_of_following":
            return f"Which of the following is {described}?"
        return f"{_cap(described)} is ____. Which option fills the blank?"

    def __call__(self, q: Question, rng: random.Random) -> list[Question]:
        forms = rng.sample(self.forms, min(self.num_variants, len(self.forms)))
        return [
            derive(q, k, self.name, question=self.render(f, q), metadata={"answer_form": f})
            for k, f in enumerate(forms)
        ]


# ---------------------------------------------------------------------------------------------
# Informative rewriters: they change what is asked, so a group that was all wrong can get spread
# ---------------------------------------------------------------------------------------------

OptionEmbed = Callable[[list[str]], Any]  # texts -> (n, d) array, as `augment.selection.Embed`


def _word_set(text: str) -> frozenset[str]:
    return frozenset(re.findall(r"[a-z0-9]+", text.lower()))


def _trigrams(text: str) -> frozenset[str]:
    t = f"  {' '.join(text.lower().split())} "
    return frozenset(t[i : i + 3] for i in range(len(t) - 2))


def _jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def distractors_by_nearness(q: Question, embed: OptionEmbed | None = None) -> list[int]:
    """Distractor indices, nearest to the gold option first (the hardest contrast first).

    Nearness: cosine of `embed` vectors of the option texts when given, else word Jaccard with
    character-trigram Jaccard breaking ties ("Omentum" / "Gut" share no word); then option order.
    """
    others = [i for i in range(len(q.options)) if i != q.answer_index]
    if not others:
        return []
    if embed is not None:
        import numpy as np

        vectors = np.asarray(embed([q.answer_text] + [q.options[i] for i in others]), dtype=np.float64)
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        sims = (vectors[1:] @ vectors[0]).tolist()
        keys = {i: (s,) for i, s in zip(others, sims)}
    else:
        gold = q.answer_text
        keys = {
            i: (_jaccard(_word_set(gold), _word_set(q.options[i])), _jaccard(_trigrams(gold), _trigrams(q.options[i])))
            for i in others
        }
    return sorted(others, key=lambda i: tuple(-k for k in keys[i]) + (i,))


class EliminateOptions:
    """Fewer distractors: keeps the gold and the `keep - 1` distractors nearest to it, drops the rest.

    The kept options stay in their original relative order and are re-lettered (the gold index
    follows its text). Further variants (`num_variants` > 1) place the gold at another letter.
    A question with `keep` options or fewer is left alone (no rewrite). `embed` (texts -> vectors)
    is set by the augmenter when it has an encoder; without it nearness is token overlap.
    """

    name = "eliminate_options"

    def __init__(self, keep: int = 2, num_variants: int = 1) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 2:
            raise ValueError(f"eliminate_options: keep must be an integer >= 2 (the gold plus a distractor), got {keep!r}")
        if isinstance(num_variants, bool) or not isinstance(num_variants, int) or num_variants < 1:
            raise ValueError(f"eliminate_options: num_variants must be an integer >= 1, got {num_variants!r}")
        self.keep, self.num_variants = keep, num_variants
        self.embed: OptionEmbed | None = None

    def __call__(self, q: Question, rng: random.Random) -> list[Question]:
        if len(q.options) <= self.keep:
            return []
        kept = sorted([q.answer_index, *distractors_by_nearness(q, self.embed)[: self.keep - 1]])
        orders = [kept]
        if self.num_variants > 1:  # the same options, the gold at other letters
            others = [i for i in kept if i != q.answer_index]
            slots = [s for s in range(len(kept)) if s != kept.index(q.answer_index)]
            for slot in rng.sample(slots, min(self.num_variants - 1, len(slots))):
                order = list(others)
                rng.shuffle(order)
                order.insert(slot, q.answer_index)
                orders.append(order)
        dropped = len(q.options) - self.keep
        return [
            derive(q, k, self.name, options=[q.options[i] for i in order], answer_index=order.index(q.answer_index),
                   metadata={"eliminated": dropped})
            for k, order in enumerate(orders)
        ]


class ContrastCue:
    """Keeps every option and adds one sentence that rules out the gold's nearest distractor.

    `template` must contain `{distractor}` (the nearest distractor's text) and must not mention
    the gold: the cue narrows the choice, it never gives the answer away.
    """

    name = "contrast_cue"
    TEMPLATE = "Hint: the answer is not {distractor}."

    def __init__(self, template: str = TEMPLATE) -> None:
        if not isinstance(template, str) or "{distractor}" not in template or "{gold" in template:
            raise ValueError(
                f"contrast_cue: template must contain '{{distractor}}' and must not name the gold, got {template!r}"
            )
        self.template = template
        self.embed: OptionEmbed | None = None

    def __call__(self, q: Question, rng: random.Random) -> list[Question]:
        nearest = distractors_by_nearness(q, self.embed)
        if not nearest:
            return []
        distractor = q.options[nearest[0]]
        stem = " ".join(q.question.split())
        cue = self.template.format(distractor=distractor)
        return [derive(q, 0, self.name, question=f"{stem} {cue}", metadata={"cue_excludes": distractor})]
