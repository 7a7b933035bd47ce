"""The synthetic scenes' vocabulary: anatomy names, families and looks for benchmarks v1, v2 and v3.

Each scene is a small RGB image cut into a `grid x grid` layout of regions, one anatomy per region,
with SGG-VQA-style multiple-choice questions about it ("What anatomy is at the top-left of the
frame?", "What is the anatomy left of the gallbladder?"). At the default 56 px and 2x2 grid every
region is exactly one merged Qwen2.5-VL visual token (two 14 px patches each way), so a network of a
few million parameters can see what it needs.

Why families: the curriculum's difficulty measure S(q) (how alike the option texts are) should
predict how hard a question really is. Anatomies of one family have alike names *and* alike looks
(colours one channel apart, or the same colour family with another texture); different families are
far apart in colour. A question whose distractors come from the gold's own family is therefore both
high-S(q) and visually hard; one with distractors from other families is low-S(q) and easy.

| name | family | rgb | texture |
| --- | --- | --- | --- |
| Cystic Duct | cystic | (210, 210, 40) | plain |
| Cystic Artery | cystic | (160, 210, 40) | plain |
| Cystic Plate | cystic | (210, 210, 90) | stripes |
| Common Bile Duct | bile_duct | (40, 80, 210) | plain |
| Common Hepatic Duct | bile_duct | (40, 130, 210) | plain |
| Hepatic Artery | bile_duct | (90, 80, 210) | vstripes |
| Gallbladder | gallbladder | (40, 160, 60) | plain |
| Gallbladder Neck | gallbladder | (40, 160, 110) | plain |
| Gallbladder Fundus | gallbladder | (90, 160, 60) | dots |
| Liver | liver | (140, 30, 30) | plain |
| Left Liver Lobe | liver | (140, 30, 80) | plain |
| Right Liver Lobe | liver | (190, 30, 30) | checker |
| Omentum | omentum | (245, 235, 170) | dots |
| Gut | gut | (240, 120, 190) | plain |
| Abdominal Wall Cavity | abdominal_wall | (25, 25, 25) | plain |
| Diaphragm | diaphragm | (180, 50, 240) | checker |
| Stomach | stomach | (250, 130, 40) | stripes |
| Falciform Ligament | falciform_ligament | (40, 220, 220) | vstripes |

Within a family colours are at most ~71/255 apart (Euclidean RGB), across families at least ~88.
The optional tool (a grey "hook", rgb (170, 170, 180)) is drawn over one region.

Benchmarks (`benchmark=`): "v1" (the default, the table above) turned out not to have the property
the curriculum relies on: 71/255 apart under pixel noise of sigma 6, family members are as easy to
tell apart as families, so after GRPO the highest-S(q) stage was not the hardest. "v2" makes visual
difficulty follow name similarity (docs/benchmark_v2/README.md has the measurement and the designs
that failed it):
- looks are v1's, except that family members with alike names (`V2_LOOKALIKE_GROUPS`: MiniLM
  cosine >= 0.65) share one look, `V2_LOOKALIKE_GAP` = 12/255 apart;
- every frame gets its own illumination, a gain in [1 - `V2_GAIN`, 1 + `V2_GAIN`] and a per-channel
  offset of sigma `V2_TINT_SIGMA` = 14: that jitter (>= 14/255 per channel, ~27 in all) exceeds the
  look-alike gap, while any two other looks differ in texture (and by >= 38/255) or by >= 100/255;
- a question's distractors are every kin of the gold that fits, the rest from other families, so
  S(q) follows the gold: singletons are low-S(q) and easy, members with a look of their own medium,
  look-alikes high-S(q) and hard. (A trained policy gives each look one name, so a look-alike gold
  is hard whatever its distractors: with v1's uniform number of kin, many hard golds land in the
  low-S(q) stage.)
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ANATOMIES",
    "BENCHMARKS",
    "BY_NAME",
    "FAMILIES",
    "V2_GAIN",
    "V2_LOOKALIKE_GAP",
    "V2_LOOKALIKE_GROUPS",
    "V2_LOOKS",
    "V2_TINT_SIGMA",
    "V3_AMBIGUOUS",
    "V3_ANATOMIES",
    "V3_BY_NAME",
    "V3_CLEAR",
    "V3_CLEAR_GAP",
    "V3_DIM",
    "V3_HARD_SHARE",
    "V3_PAIRS",
    "V3_TWIN_GAP",
    "Anatomy",
]


@dataclass(frozen=True)
class Anatomy:
    """One class of the synthetic vocabulary: how it is named, grouped and drawn."""

    name: str
    family: str
    rgb: tuple[int, int, int]
    texture: str


ANATOMIES: tuple[Anatomy, ...] = (
    Anatomy("Cystic Duct", "cystic", (210, 210, 40), "plain"),
    Anatomy("Cystic Artery", "cystic", (160, 210, 40), "plain"),
    Anatomy("Cystic Plate", "cystic", (210, 210, 90), "stripes"),
    Anatomy("Common Bile Duct", "bile_duct", (40, 80, 210), "plain"),
    Anatomy("Common Hepatic Duct", "bile_duct", (40, 130, 210), "plain"),
    Anatomy("Hepatic Artery", "bile_duct", (90, 80, 210), "vstripes"),
    Anatomy("Gallbladder", "gallbladder", (40, 160, 60), "plain"),
    Anatomy("Gallbladder Neck", "gallbladder", (40, 160, 110), "plain"),
    Anatomy("Gallbladder Fundus", "gallbladder", (90, 160, 60), "dots"),
    Anatomy("Liver", "liver", (140, 30, 30), "plain"),
    Anatomy("Left Liver Lobe", "liver", (140, 30, 80), "plain"),
    Anatomy("Right Liver Lobe", "liver", (190, 30, 30), "checker"),
    Anatomy("Omentum", "omentum", (245, 235, 170), "dots"),
    Anatomy("Gut", "gut", (240, 120, 190), "plain"),
    Anatomy("Abdominal Wall Cavity", "abdominal_wall", (25, 25, 25), "plain"),
    Anatomy("Diaphragm", "diaphragm", (180, 50, 240), "checker"),
    Anatomy("Stomach", "stomach", (250, 130, 40), "stripes"),
    Anatomy("Falciform Ligament", "falciform_ligament", (40, 220, 220), "vstripes"),
)
BY_NAME: dict[str, Anatomy] = {a.name: a for a in ANATOMIES}
FAMILIES: dict[str, tuple[Anatomy, ...]] = {
    fam: tuple(a for a in ANATOMIES if a.family == fam) for fam in dict.fromkeys(a.family for a in ANATOMIES)
}
BENCHMARKS = ("v1", "v2", "v3")
# v2 looks: v1's, except that family members whose names are alike (all-MiniLM-L6-v2 cosine >= 0.65:
# gallbladder / neck / fundus 0.73-0.81, the two liver lobes 0.96, common bile / common hepatic duct
# 0.80, cystic duct / artery 0.68) share one look, the group's first member's, each further member
# tinted by V2_LOOKALIKE_GAP in one channel, below the per-frame lighting jitter. The other members
# (names 0.44-0.62 alike: Cystic Plate, Hepatic Artery, Liver) keep their own v1 colour and texture.
V2_LOOKALIKE_GROUPS: tuple[tuple[str, ...], ...] = (
    ("Cystic Duct", "Cystic Artery"),
    ("Common Bile Duct", "Common Hepatic Duct"),
    ("Gallbladder", "Gallbladder Neck", "Gallbladder Fundus"),
    ("Right Liver Lobe", "Left Liver Lobe"),
)
V2_LOOKALIKE_GAP = 12.0
V2_GAIN = 0.15  # brightness factor uniform in [1 - V2_GAIN, 1 + V2_GAIN], one per frame
V2_TINT_SIGMA = 14.0  # per-channel offset, one per frame


def _v2_looks() -> dict[str, Anatomy]:
    looks = dict(BY_NAME)
    for group in V2_LOOKALIKE_GROUPS:
        base = BY_NAME[group[0]]
        for i, name in enumerate(group):
            tint = [0.0, 0.0, 0.0]
            if i:
                tint[i - 1] = V2_LOOKALIKE_GAP
            rgb = tuple(int(v + t) for v, t in zip(base.rgb, tint))
            looks[name] = Anatomy(name, base.family, rgb, base.texture)  # type: ignore[arg-type]
    return looks


V2_LOOKS: dict[str, Anatomy] = _v2_looks()

# v3 (docs/benchmark_v3): every anatomy has one twin whose name is alike (all-MiniLM-L6-v2 cosine
# 0.69-0.96); pairs are far apart in colour. Difficulty varies within every class, and the option
# set tells it: half the frames are "hard", the anatomy seen in an ambiguous view (twins share the
# pair's texture and its colour dimmed by V3_DIM, the second twin V3_TWIN_GAP brighter in one
# channel before dimming, under v2's per-frame lighting), and the question's distractors are the gold's twin plus both members of one other pair;
# the other half are "easy", a clear view (the second twin has a texture and colour of its own) and
# distractors from three other pairs, one each. So every class has easy and hard questions, a
# class-neutral S(q) ranks them, and the text alone gives nothing away: in a hard question every
# option has its name twin among the options, in an easy one none has.
V3_PAIRS: tuple[tuple[str, str, tuple[int, int, int], str], ...] = (
    ("Cystic Duct", "Cystic Artery", (210, 210, 40), "plain"),
    ("Common Bile Duct", "Common Hepatic Duct", (40, 80, 210), "plain"),
    ("Gallbladder Neck", "Gallbladder Fundus", (40, 160, 60), "plain"),
    ("Left Liver Lobe", "Right Liver Lobe", (140, 30, 30), "plain"),
    ("Greater Omentum", "Lesser Omentum", (245, 235, 170), "dots"),
    ("Falciform Ligament", "Round Ligament", (40, 220, 220), "vstripes"),
    ("Small Bowel", "Large Bowel", (240, 120, 190), "plain"),
    ("Diaphragm Dome", "Diaphragm Crus", (180, 50, 240), "checker"),
)
V3_TWIN_GAP = 20.0  # ambiguous view: the second twin is this much brighter in the pair colour's lowest channel
V3_CLEAR_GAP = 60.0  # clear view: ... this much, and it has a texture of its own
V3_HARD_SHARE = 0.5  # share of questions whose distractors include the gold's twin


def _v3_anatomies() -> tuple[Anatomy, ...]:
    out = []
    for a, b, rgb, texture in V3_PAIRS:
        channel = min(range(3), key=lambda i: rgb[i])
        twin = tuple(int(v + (V3_TWIN_GAP if i == channel else 0)) for i, v in enumerate(rgb))
        family = a.lower().replace(" ", "_")
        out += [Anatomy(a, family, rgb, texture), Anatomy(b, family, twin, texture)]  # type: ignore[arg-type]
    return tuple(out)


V3_ANATOMIES: tuple[Anatomy, ...] = _v3_anatomies()
V3_BY_NAME: dict[str, Anatomy] = {a.name: a for a in V3_ANATOMIES}
V3_DIM = 0.55  # ambiguous view: the pair's colour dimmed by this factor (a look no clear view has)


def _v3_ambiguous() -> dict[str, Anatomy]:
    return {a.name: Anatomy(a.name, a.family, tuple(int(v * V3_DIM) for v in a.rgb), a.texture)  # type: ignore[arg-type]
            for a in V3_ANATOMIES}


V3_AMBIGUOUS: dict[str, Anatomy] = _v3_ambiguous()


def _v3_clear() -> dict[str, Anatomy]:
    looks = {}
    for a, b, rgb, texture in V3_PAIRS:
        channel = min(range(3), key=lambda i: rgb[i])
        twin = tuple(int(v + (V3_CLEAR_GAP if i == channel else 0)) for i, v in enumerate(rgb))
        own = "checker" if texture != "checker" else "stripes"
        looks[a] = V3_BY_NAME[a]
        looks[b] = Anatomy(b, V3_BY_NAME[b].family, twin, own)  # type: ignore[arg-type]
    return looks


V3_CLEAR: dict[str, Anatomy] = _v3_clear()
