"""Question rewriters for Group Diversity Question Augmentation (GDQA).

A rewriter turns one hard question into a few new ones. The informative ones (the defaults)
change what is asked so an all-wrong group can get reward spread: `eliminate_options` drops the
distractors farthest from the gold, `contrast_cue` adds a hint ruling out the gold's nearest
distractor. The others ask the same thing from another angle (a paraphrased stem, an inverted
spatial relation, reordered options, another answer form); measured at equal compute they did not
help (docs: DESIGN.md, GDQA). Every rewrite keeps the image and the gold option text, so the reward
functions (which check the letter or the option text) stay valid. All randomness comes from the `random.Random` passed in,
so a seeded augmenter makes the same rewrites on every rank and after a resume.

YAML lists rewriters by registry name, with arguments where wanted:

    rewriters: [{name: eliminate_options, keep: 2}, contrast_cue, template_paraphrase]
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from anatomy_lightning.data.prompts import PIN_KEY
from anatomy_lightning.data.schema import LETTERS, Question

__all__ = [
    "REWRITERS",
    "AnswerForm",
    "Chain",
    "Clause",
    "ContrastCue",
    "EliminateOptions",
    "InvertRelation",
    "LocalModelRewriter",
    "ParsedStem",
    "Rewriter",
    "ShuffleOptions",
    "TemplateParaphrase",
    "build_rewriter",
    "build_rewriters",
    "derive",
    "distractors_by_nearness",
    "parse_stem",
    "validate_generated",
]


@runtime_checkable
class Rewriter(Protocol):
    """Maps a question to zero or more rewrites; must only use `rng` for randomness."""

    name: str

    def __call__(self, q: Question, rng: random.Random) -> list[Question]: ...


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


# ---------------------------------------------------------------------------------------------
# Stem parsing: the SGG-VQA question forms (and the synthetic scenes' simpler ones)
# ---------------------------------------------------------------------------------------------

# canonical relation -> surface forms: the data's own plus a few rewordings (first is the plainest)
_SURFACES: dict[str, tuple[str, ...]] = {
    "left": ("left of", "to the left of", "on the left side of"),
    "right": ("right of", "to the right of", "on the right side of"),
    "above": ("above", "higher than"),
    "below": ("below", "beneath", "under"),
    "within": ("within", "inside"),
    "horizontal": ("horizontal to", "horizontally aligned with"),
    "vertical": ("vertical to", "vertically aligned with"),
    "retracted_by": ("retracted by", "held back by"),
    "coagulated_by": ("coagulated by", "being coagulated by"),
}
_EXTRA_SURFACES = {"horizontal": ("horizontal",), "vertical": ("vertical",)}  # as written in SGG-VQA
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
_SURFACE_TO_REL = {
    s: rel for rel in _SURFACES for s in _SURFACES[rel] + _EXTRA_SURFACES.get(rel, ())
}
_REL_RE = "|".join(sorted(map(re.escape, _SURFACE_TO_REL), key=len, reverse=True))
_CLAUSE_RE = re.compile(rf"(?P<rel>{_REL_RE}|\w+ed by) the (?P<ref>.+)")
_CLAUSE_SPLIT_RE = re.compile(rf" and (?=(?:{_REL_RE}|\w+ed by) the )")

_POS = r"(?:top|bottom|mid|upper|lower)-(?:left|mid|right|middle)|center|centre"
_NOUN = r"(?:anatomy|thing|object|structure|organ)"
_TARGET = rf"(?:[\w\-]+ ){{0,3}}?{_NOUN}"
_NOT_DESC = {"name", "of", "the", "that", "is", "a", "an", "which", "what"}

_POSITION_RE = re.compile(rf"^what anatomy is (?:at|in) the (?P<pos>{_POS}) of the (?:frame|image)$")
_RELATION_RES = [
    re.compile(rf"^what is the name of the (?P<target>{_TARGET})(?: that is)? (?P<clauses>.+)$"),
    re.compile(rf"^what name is the (?P<target>{_TARGET})(?: that is)? (?P<clauses>.+)$"),
    re.compile(rf"^what is the (?P<target>{_TARGET})(?: that is)? (?P<clauses>.+)$"),
    re.compile(rf"^which (?P<target>{_TARGET}) is (?P<clauses>.+)$"),
    re.compile(
        rf"^there is an? (?P<target>{_TARGET})(?: that is)? (?P<clauses>.+?)[;,] "
        r"what (?:is its name|name is it|is it)$"
    ),
]
_ATTRIBUTE_RES = [
    re.compile(r"^what is the (?P<desc>(?:[\w\-]+ ){1,3})anatomy$"),
    re.compile(r"^there is an? (?P<desc>(?:[\w\-]+ ){1,3})anatomy[;,] what (?:is its name|name is it|is it)$"),
]


@dataclass(frozen=True)
class Clause:
    """One spatial or action relation of the answer to a reference: ("left", "red gut thing")."""

    relation: str
    reference: str
    surface: str

    def render(self, rng: random.Random | None = None) -> str:
        forms = _SURFACES.get(self.relation, (self.surface,))
        return f"{rng.choice(forms) if rng else forms[0]} the {self.reference}"


@dataclass(frozen=True)
class ParsedStem:
    """A stem read into (kind, slots). kind: position | attribute | relation | unknown."""

    kind: str
    text: str
    target: str = "anatomy"  # the answer's noun phrase, e.g. "red top-mid thing"
    position: str | None = None
    clauses: tuple[Clause, ...] = ()


def _clean(stem: str) -> str:
    """One line, no trailing '?', the dataset's ' ?' and '?;' quirks removed, lower case."""
    text = " ".join(stem.split())
    text = text.replace("?;", ";").replace(" ?", "?").strip().rstrip("?").strip()
    return text.lower()


def _clauses(text: str) -> tuple[Clause, ...] | None:
    text = text.removeprefix("both ")
    out = []
    for part in _CLAUSE_SPLIT_RE.split(text):
        m = _CLAUSE_RE.fullmatch(part)
        if m is None:
            return None
        surface = m["rel"]
        out.append(Clause(_SURFACE_TO_REL.get(surface, surface.replace(" ", "_")), m["ref"], surface))
    return tuple(out) if 1 <= len(out) <= 3 else None


def parse_stem(stem: str) -> ParsedStem:
    """Parse an SGG-VQA style stem; anything else is `unknown` (generic paraphrases only)."""
    text = _clean(stem)
    if m := _POSITION_RE.match(text):
        return ParsedStem("position", stem, position=m["pos"])
    for pattern in _RELATION_RES:
        m = pattern.match(text)
        if m and (clauses := _clauses(m["clauses"])):
            pos = re.search(rf"\b({_POS})\b", m["target"])
            return ParsedStem("relation", stem, target=m["target"], position=pos and pos[1], clauses=clauses)
    for pattern in _ATTRIBUTE_RES:
        m = pattern.match(text)
        if m and not set(m["desc"].split()) & _NOT_DESC:
            desc = m["desc"].strip()
            pos = re.search(rf"\b({_POS})\b", desc)
            return ParsedStem("attribute", stem, target=f"{desc} anatomy", position=pos and pos[1])
    return ParsedStem("unknown", stem)


def _a(noun_phrase: str) -> str:
    return f"{'an' if noun_phrase[:1] in 'aeiou' else 'a'} {noun_phrase}"


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _same(a: str, b: str) -> bool:
    return _clean(a) == _clean(b)


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


# ---------------------------------------------------------------------------------------------
# Rewriters
# ---------------------------------------------------------------------------------------------


def _pick(texts: list[str], orig: str, n: int, rng: random.Random) -> list[str]:
    """Up to n distinct texts that differ from the original, chosen with `rng`."""
    unique = [t for t in dict.fromkeys(texts) if not _same(t, orig)]
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


class Chain:
    """Applies rewriters in sequence (each output of one goes through the next): composition."""

    def __init__(self, steps: Sequence[Rewriter | str | Mapping[str, Any]], num_variants: int = 2) -> None:
        self.steps = build_rewriters(steps)
        if not self.steps:
            raise ValueError("chain: `steps` is empty; list at least one rewriter name")
        self.name = "+".join(s.name for s in self.steps)
        self.num_variants = num_variants

    def __call__(self, q: Question, rng: random.Random) -> list[Question]:
        current = [q]
        for step in self.steps:
            current = [r for c in current for r in step(c, rng)]
        chosen = rng.sample(current, min(self.num_variants, len(current)))
        keep = ("answer_form",)  # per-step annotations worth carrying to the final rewrite
        return [
            derive(q, k, self.name, question=c.question, options=c.options, answer_index=c.answer_index,
                   metadata={key: c.metadata[key] for key in keep if key in c.metadata})
            for k, c in enumerate(chosen)
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


# ---------------------------------------------------------------------------------------------
# Optional: a local text-generation model as a paraphraser
# ---------------------------------------------------------------------------------------------

_OPTION_LINE_RE = re.compile(rf"^\s*\(?([{LETTERS}])[.)]\s*(.+?)\s*$")


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9_\-]+", text.lower()))


def validate_generated(
    text: str, q: Question, min_words: int = 4, max_words: int = 60, min_overlap: float = 0.2
) -> Question | None:
    """Turn one generated text into a rewrite of `q`, or None if it is unusable.

    Read: the first non-empty line is the new stem; option lines right after it ("A. Liver"), if
    any, are the new option order; anything after that is ignored (models ramble on). Kept only
    if the stem ends with '?', has min_words..max_words words, differs from the original, shares
    at least `min_overlap` of its word set with it (drops gibberish), does not name the gold option
    unless the original did (no answer leak), and any options listed are exactly the original
    option texts (so the gold option is still there; its index follows its text).
    """
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return None
    stem = " ".join(lines[0].split())
    options = [m[2] for m in itertools.takewhile(bool, (_OPTION_LINE_RE.match(ln) for ln in lines[1:]))]
    if not stem.endswith("?") or not (min_words <= len(stem.split()) <= max_words) or _same(stem, q.question):
        return None
    new, old = _words(stem), _words(q.question)
    if len(new & old) / max(1, len(new | old)) < min_overlap:
        return None
    gold = re.compile(rf"\b{re.escape(q.answer_text.lower())}\b")
    if gold.search(stem.lower()) and not gold.search(q.question.lower()):
        return None
    if not options:
        return q.replace(question=stem)
    if sorted(options) != sorted(q.options):
        return None  # lost, added or changed an option: the gold answer is no longer guaranteed
    return q.replace(question=stem, options=options, answer_index=options.index(q.answer_text))


class LocalModelRewriter:
    """Paraphrases with a local text-generation model (optional; never downloads anything).

    `model` is a folder holding a transformers causal LM and its tokenizer. Outputs are checked
    by `validate_generated`; candidates that fail are dropped, so a weak model yields fewer
    rewrites, never wrong ones. The model loads on first use, not at construction.
    """

    name = "local_model"
    PROMPT = (
        "Rewrite the multiple-choice question below so it asks the same thing in different words. "
        "Keep the options unchanged.\nQuestion: {question}\n{options}\nRewritten question:"
    )

    def __init__(
        self,
        model: str,
        num_variants: int = 2,
        num_candidates: int = 4,
        max_new_tokens: int = 48,
        temperature: float = 0.9,
        device: str | int | None = None,
    ) -> None:
        self.model_path, self.device = model, device
        self.num_variants, self.num_candidates = num_variants, num_candidates
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self._pipe: Callable[..., Any] | None = None

    def _pipeline(self) -> Callable[..., Any]:
        if self._pipe is None:
            from pathlib import Path

            from transformers import pipeline

            if not Path(self.model_path).is_dir():
                raise FileNotFoundError(
                    f"local_model rewriter: model folder {self.model_path!r} does not exist; give the path "
                    "of a locally saved causal LM (save_pretrained output); models are never downloaded"
                )
            # a folder path never touches the hub; HF_HUB_OFFLINE=1 guards the rest
            self._pipe = pipeline("text-generation", model=self.model_path, device=self.device)
        return self._pipe

    def generate(self, q: Question, rng: random.Random) -> list[str]:
        import torch

        pipe = self._pipeline()
        prompt = self.PROMPT.format(question=q.question.strip(), options=q.options_block())
        with torch.random.fork_rng(devices=[]):  # seeded from rng, global RNG state untouched
            torch.manual_seed(rng.randrange(2**31))
            out = pipe(
                prompt,
                do_sample=True,
                temperature=self.temperature,
                max_new_tokens=self.max_new_tokens,
                num_return_sequences=self.num_candidates,
                return_full_text=False,
                pad_token_id=pipe.tokenizer.pad_token_id or pipe.tokenizer.eos_token_id,
            )
        return [o["generated_text"] for o in out]

    def __call__(self, q: Question, rng: random.Random) -> list[Question]:
        kept: list[Question] = []
        for text in self.generate(q, rng):
            r = validate_generated(text, q)
            if r is not None and all(not _same(r.question, k.question) for k in kept):
                kept.append(r)
        kept = kept[: self.num_variants]
        return [
            derive(q, k, self.name, question=r.question, options=r.options, answer_index=r.answer_index)
            for k, r in enumerate(kept)
        ]


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

REWRITERS: dict[str, Callable[..., Rewriter]] = {
    TemplateParaphrase.name: TemplateParaphrase,
    InvertRelation.name: InvertRelation,
    ShuffleOptions.name: ShuffleOptions,
    AnswerForm.name: AnswerForm,
    EliminateOptions.name: EliminateOptions,
    ContrastCue.name: ContrastCue,
    LocalModelRewriter.name: LocalModelRewriter,
    "chain": Chain,
}


def build_rewriter(spec: Rewriter | str | Mapping[str, Any]) -> Rewriter:
    """A rewriter from a registry name, a {name: ..., **args} mapping, or an instance."""
    if isinstance(spec, str):
        spec = {"name": spec}
    if isinstance(spec, Mapping):
        args = dict(spec)
        name = args.pop("name", None)
        if name not in REWRITERS:
            raise ValueError(
                f"augment rewriters: unknown rewriter {name!r} in {dict(spec)!r}; "
                f"choose one of {sorted(REWRITERS)} (as a name or as {{name: ..., <args>}})"
            )
        try:
            return REWRITERS[name](**args)
        except TypeError as err:
            raise ValueError(f"augment rewriters: bad arguments for {name!r}: {args!r} ({err})") from err
    if callable(spec) and isinstance(getattr(spec, "name", None), str):
        return spec
    raise ValueError(f"augment rewriters: {spec!r} is not a rewriter name, mapping or Rewriter object")


def build_rewriters(specs: Sequence[Rewriter | str | Mapping[str, Any]]) -> list[Rewriter]:
    return [build_rewriter(s) for s in specs]
