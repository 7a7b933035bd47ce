"""The stem grammar of SGG-VQA questions (and the synthetic scenes' simpler ones).

`parse_stem` reads a question into its kind (position, relation, attribute) and slots, so the rule
rewriters can restate it; a stem it cannot read is `unknown` and only gets generic rewordings.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

__all__ = ["Clause", "ParsedStem", "clean_stem", "parse_stem", "same_stem"]

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


def clean_stem(stem: str) -> str:
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
    text = clean_stem(stem)
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


def same_stem(a: str, b: str) -> bool:
    """Whether two stems are the same question text (case, spacing and the dataset's '?' quirks aside)."""
    return clean_stem(a) == clean_stem(b)
