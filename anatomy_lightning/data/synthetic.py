"""Seeded synthetic surgical scenes: an offline benchmark that a tiny VLM can learn with GRPO on CPU.

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

Files: `write_synthetic_split` writes `<split>.jsonl` (one `Question.to_record()` per line, image
paths relative to the JSONL's folder), `images/<split>-<scene>.png` (questions of one scene share
it) and `<split>.manifest.json`, which lets a second call with the same content skip all work.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from anatomy_lightning.data.schema import MAX_OPTIONS, MIN_OPTIONS, Question

FORMAT_VERSION = 1  # bump when rendering or question generation changes, so old files are rewritten


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
TEXTURES = ("plain", "stripes", "vstripes", "dots", "checker")
TEXTURE_DEPTH = 0.45  # textured pixels are darkened by this share of their colour
TOOL_NAME, TOOL_RGB = "hook", (170, 170, 180)
KINDS = ("position", "relation", "tool")
# relation phrase -> (row step, column step) from the reference to the answer
RELATIONS: dict[str, tuple[int, int]] = {"left of": (0, -1), "right of": (0, 1), "above": (-1, 0), "below": (1, 0)}
_ROWS = {2: ("top", "bottom"), 3: ("top", "mid", "bottom")}
_COLS = {2: ("left", "right"), 3: ("left", "mid", "right")}


def position_name(row: int, col: int, grid: int) -> str:
    """SGG-VQA's position words ("top-left", "bottom-mid"); larger grids fall back to numbers."""
    if grid == 1:
        return "center"
    if grid in _ROWS:
        if grid == 3 and row == 1 and col == 1:
            return "center"
        return f"{_ROWS[grid][row]}-{_COLS[grid][col]}"
    return f"row {row + 1}, column {col + 1}"


@dataclass(frozen=True)
class Scene:
    """A frame's layout: anatomy names row by row, the tool's cell (if any) and its noise seed."""

    id: str
    grid: int
    layout: tuple[str, ...]
    tool_cell: int | None
    noise_seed: int
    hard: bool = False  # v3: an ambiguous view (twins look alike) and the twin among the distractors

    def at(self, row: int, col: int) -> str:
        return self.layout[row * self.grid + col]

    def cell_of(self, name: str) -> tuple[int, int]:
        return divmod(self.layout.index(name), self.grid)


@functools.lru_cache(maxsize=8)
def _texture_masks(size: int) -> dict[str, np.ndarray]:
    """Texture masks in absolute image coordinates; periods divide 14 so every patch looks alike."""
    y, x = np.mgrid[0:size, 0:size]
    dot = lambda v: (v % 7 >= 2) & (v % 7 <= 4)  # noqa: E731 - 3 px dots on a 7 px pitch
    masks = {
        "plain": np.zeros((size, size), bool),
        "stripes": y % 2 == 1,
        "vstripes": x % 2 == 1,
        "dots": dot(y) & dot(x),
        "checker": (y // 7 + x // 7) % 2 == 1,
    }
    return {k: (1.0 - TEXTURE_DEPTH * m)[..., None].astype(np.float32) for k, m in masks.items()}


class SceneGenerator:
    """Draws unique scenes and SGG-VQA-style questions about them, reproducibly from `seed`.

    Consecutive calls continue one random stream and never repeat a layout (with
    `unique_scenes`), which is how `write_synthetic_dataset` keeps its splits' scenes disjoint.
    `questions()` makes text-only questions (no image rendered or written), fast enough to score
    100k questions for S(q); `render()` draws a scene's image on demand.
    """

    def __init__(
        self,
        seed: int = 0,
        image_size: int = 56,
        grid: int = 2,
        num_options: int = 4,
        noise: float = 6.0,
        kinds: Sequence[str] = ("position", "relation"),
        tool: bool = False,
        questions_per_scene: int = 2,
        unique_scenes: bool = True,
        benchmark: str = "v1",
    ) -> None:
        kinds = tuple(kinds)
        problems = []
        if benchmark not in BENCHMARKS:
            problems.append(f"benchmark={benchmark!r}: use one of {list(BENCHMARKS)}")
        if image_size < 16:  # processors resize to their own patch grid (Qwen2.5-VL 28, Qwen3-VL 32, ...)
            problems.append(f"image_size={image_size}: use at least 16 pixels, ideally a multiple of the model's "
                            "patch x merge size (56 for Qwen2.5-VL, 64 for Qwen3-VL)")
        if not 1 <= grid or grid * grid > len(ANATOMIES):
            problems.append(f"grid={grid}: needs 1 <= grid and grid*grid <= {len(ANATOMIES)} anatomies (grid <= 4)")
        if not MIN_OPTIONS <= num_options <= MAX_OPTIONS:
            problems.append(f"num_options={num_options}: use {MIN_OPTIONS} to {MAX_OPTIONS}")
        if noise < 0:
            problems.append(f"noise={noise}: use a pixel standard deviation >= 0 (0 turns noise off)")
        if questions_per_scene < 1:
            problems.append(f"questions_per_scene={questions_per_scene}: use >= 1")
        bad = [k for k in kinds if k not in KINDS]
        if bad or not kinds:
            problems.append(f"kinds={list(kinds)}: use a non-empty subset of {list(KINDS)}")
        if "relation" in kinds and grid < 2:
            problems.append("kinds has 'relation' but grid=1 has no neighbours: use grid >= 2 or drop 'relation'")
        if "tool" in kinds and not tool:
            problems.append("kinds has 'tool' but tool=False draws no hook: set tool=True or drop 'tool'")
        if problems:
            raise ValueError("SceneGenerator: " + "; ".join(problems))
        self.seed, self.image_size, self.grid, self.num_options = seed, image_size, grid, num_options
        self.noise, self.kinds, self.tool = float(noise), kinds, tool
        self.questions_per_scene, self.unique_scenes = questions_per_scene, unique_scenes
        self.benchmark = benchmark
        self._looks = {"v1": BY_NAME, "v2": V2_LOOKS, "v3": V3_BY_NAME}[benchmark]
        vocabulary = V3_ANATOMIES if benchmark == "v3" else ANATOMIES
        self._rng = random.Random(seed)
        self._seen: set[tuple[tuple[str, ...], int | None]] = set()
        self._n_scenes = 0
        self._gold_deck: list[int] = []  # balanced gold letters: each block of num_options uses every letter once
        self._names = [a.name for a in vocabulary]
        self._families = {f: tuple(a for a in vocabulary if a.family == f) for f in dict.fromkeys(a.family for a in vocabulary)}
        self._others = {f: [a for a in vocabulary if a.family != f] for f in self._families}

    # -- scenes ------------------------------------------------------------------------------

    def scene(self) -> Scene:
        """The next scene of the stream (a layout not drawn before by this generator)."""
        cells = self.grid * self.grid
        for _ in range(1000):
            layout = tuple(self._rng.sample(self._names, cells))
            tool_cell = self._rng.randrange(cells) if self.tool else None
            noise_seed = self._rng.getrandbits(31)
            key = (layout, tool_cell)
            if not self.unique_scenes or key not in self._seen:
                break
        else:
            raise ValueError(
                f"SceneGenerator(seed={self.seed}, grid={self.grid}): ran out of new layouts after "
                f"{len(self._seen)} scenes; ask for fewer questions, raise questions_per_scene or grid, "
                "or set unique_scenes=False"
            )
        self._seen.add(key)
        hard = self.benchmark == "v3" and self._rng.random() < V3_HARD_SHARE  # v1/v2 draw nothing here
        scene = Scene(f"s{self.seed}-{self._n_scenes:06d}", self.grid, layout, tool_cell, noise_seed, hard)
        self._n_scenes += 1
        return scene

    def render(self, scene: Scene) -> Image.Image:
        """The scene's RGB image; the same scene and settings always give the same pixels."""
        size, grid = self.image_size, scene.grid
        masks = _texture_masks(size)
        edges = np.linspace(0, size, grid + 1).round().astype(int)
        img = np.empty((size, size, 3), np.float32)
        for idx, name in enumerate(scene.layout):
            r, c = divmod(idx, grid)
            ys, xs = slice(edges[r], edges[r + 1]), slice(edges[c], edges[c + 1])
            a = (V3_AMBIGUOUS if scene.hard else V3_CLEAR)[name] if self.benchmark == "v3" else self._looks[name]
            img[ys, xs] = np.asarray(a.rgb, np.float32) * masks[a.texture][ys, xs]
        if scene.tool_cell is not None:
            r, c = divmod(scene.tool_cell, grid)
            self._draw_hook(img, edges[r], edges[c], edges[r + 1] - edges[r])
        noise_rng = np.random.default_rng(scene.noise_seed)
        if self.noise > 0:
            img += noise_rng.normal(0.0, self.noise, img.shape).astype(np.float32)
        if self.benchmark != "v1":  # drawn after the pixel noise: v1's noise stream is untouched
            gain, tint = self.illumination(noise_rng)
            img = img * gain + tint
        return Image.fromarray(np.clip(img.round(), 0, 255).astype(np.uint8), "RGB")

    @staticmethod
    def illumination(rng: np.random.Generator) -> tuple[float, np.ndarray]:
        """v2's per-frame lighting: a brightness gain and a per-channel offset (float32, shape (3,))."""
        gain = float(rng.uniform(1.0 - V2_GAIN, 1.0 + V2_GAIN))
        return gain, rng.normal(0.0, V2_TINT_SIGMA, 3).astype(np.float32)

    @staticmethod
    def _draw_hook(img: np.ndarray, top: int, left: int, cell: int) -> None:
        # an L-shaped instrument tip: a shaft down to 60% of the cell, then a short hook to the right;
        # it covers well under a fifth of the region so the anatomy stays recognisable
        w = max(2, cell // 10)
        x0, y1 = left + int(cell * 0.35), top + int(cell * 0.6)
        img[top : y1 + w, x0 : x0 + w] = TOOL_RGB
        img[y1 : y1 + w, x0 : x0 + int(cell * 0.3)] = TOOL_RGB

    # -- questions ---------------------------------------------------------------------------

    def ask(self, scene: Scene, split: str = "train", image: str | None = None) -> list[Question]:
        """Up to `questions_per_scene` distinct questions about `scene`, kinds drawn evenly."""
        rng, grid = self._rng, scene.grid
        pool: dict[str, list[tuple[Any, ...]]] = {}
        cells = [divmod(i, grid) for i in range(grid * grid)]
        if "position" in self.kinds:
            pool["position"] = [(r, c) for r, c in cells]
        if "relation" in self.kinds:
            pool["relation"] = [
                (r + dr, c + dc, rel, r, c)
                for r, c in cells
                for rel, (dr, dc) in RELATIONS.items()
                if 0 <= r + dr < grid and 0 <= c + dc < grid
            ]
        if "tool" in self.kinds and scene.tool_cell is not None:
            pool["tool"] = [divmod(scene.tool_cell, grid)]
        out: list[Question] = []
        while len(out) < self.questions_per_scene:
            kinds = [k for k in self.kinds if pool.get(k)]
            if not kinds:
                break
            kind = rng.choice(kinds)
            target = pool[kind].pop(rng.randrange(len(pool[kind])))
            row, col = target[0], target[1]
            gold = self._looks[scene.at(row, col)]
            meta: dict[str, Any] = {"kind": kind, "position": position_name(row, col, grid), "row": row, "col": col}
            if kind == "position":
                stem = f"What anatomy is at the {meta['position']} of the frame?"
            elif kind == "relation":
                rel, ref = target[2], scene.at(target[3], target[4])
                stem = f"What is the anatomy {rel} the {ref.lower()}?"
                meta.update(relation=rel, reference=ref)
            else:
                stem = f"What is the anatomy retracted by the {TOOL_NAME}?"
                meta.update(tool=TOOL_NAME)
            options, answer_index, n_hard = self._options(gold, scene.hard)
            meta.update(family=gold.family, anatomy=gold.name, scene=scene.id, hard_distractors=n_hard)
            out.append(
                Question(
                    id=f"synth-{split}-{scene.id}-q{len(out)}",
                    question=stem,
                    options=options,
                    answer_index=answer_index,
                    images=[image] if image else [],
                    metadata=meta,
                )
            )
        return out

    def _options(self, gold: Anatomy, hard: bool = False) -> tuple[list[str], int, int]:
        """Gold plus distractors: some same-family (hard) ones, the rest from other families.

        v1 draws a uniform number of same-family distractors; v2 takes as many as fit.
        """
        rng, k = self._rng, self.num_options
        if self.benchmark == "v3":
            distractors, n_hard = self._v3_distractors(gold, hard)
            return self._place(gold, distractors) + (n_hard,)
        kin = [a for a in self._families[gold.family] if a.name != gold.name]
        # v2: always every kin that fits, so S(q) follows the gold (see the module docstring)
        n_hard = min(k - 1, len(kin)) if self.benchmark == "v2" else rng.randint(0, min(k - 1, len(kin)))
        distractors = rng.sample(kin, n_hard) + rng.sample(self._others[gold.family], k - 1 - n_hard)
        return self._place(gold, distractors) + (n_hard,)

    def _v3_distractors(self, gold: Anatomy, hard: bool) -> tuple[list[Anatomy], int]:
        """v3: easy = one member each of k-1 other pairs; hard = the twin, then whole other pairs
        (a last single one if k is odd), so every option's name twin is among the options."""
        rng, k = self._rng, self.num_options
        pairs = [f for f in self._families if f != gold.family]
        rng.shuffle(pairs)
        if not hard:
            return [rng.choice(self._families[f]) for f in pairs[: k - 1]], 0
        out = [a for a in self._families[gold.family] if a.name != gold.name]
        for f in pairs:
            room = k - 1 - len(out)
            if room <= 0:
                break
            members = list(self._families[f])
            out += members if room >= len(members) else rng.sample(members, room)
        return out, 1

    def _place(self, gold: Anatomy, distractors: list[Anatomy]) -> tuple[list[str], int]:
        """Options in a shuffled order with the gold at the next letter of a balanced deck."""
        rng, k = self._rng, self.num_options
        rng.shuffle(distractors)
        if not self._gold_deck:
            self._gold_deck = list(range(k))
            rng.shuffle(self._gold_deck)
        at = self._gold_deck.pop()
        names = [a.name for a in distractors]
        return names[:at] + [gold.name] + names[at:], at

    def draw(self, n: int, split: str = "train", with_images: bool = False) -> list[tuple[Scene, list[Question]]]:
        """`n` questions grouped by scene; with `with_images` each points at `images/<split>-<scene>.png`."""
        if n < 0:
            raise ValueError(f"n={n}: the number of questions must be >= 0")
        out: list[tuple[Scene, list[Question]]] = []
        total = 0
        while total < n:
            scene = self.scene()
            image = f"images/{split}-{scene.id}.png" if with_images else None
            qs = self.ask(scene, split, image)[: n - total]
            out.append((scene, qs))
            total += len(qs)
        return out

    def questions(self, n: int, split: str = "train", with_images: bool = False) -> list[Question]:
        """`n` questions; text-only by default (images == []), which is what S(q) scoring needs."""
        return [q for _, qs in self.draw(n, split, with_images) for q in qs]

    def render_settings(self) -> dict[str, Any]:
        """Everything besides the JSONL text that decides the image bytes (recorded in the manifest)."""
        settings = {"image_size": self.image_size, "noise": self.noise, "format_version": FORMAT_VERSION}
        if self.benchmark != "v1":  # v1's manifest stays byte for byte what it was
            settings["benchmark"] = self.benchmark
        return settings


# -- files -------------------------------------------------------------------------------------


def _write_split(out_dir: Path, split: str, gen: SceneGenerator, n: int) -> Path:
    drawn = gen.draw(n, split, with_images=True)
    text = "".join(json.dumps(q.to_record(), ensure_ascii=False) + "\n" for _, qs in drawn for q in qs)
    manifest = {
        "split": split,
        "questions": n,
        "scenes": len(drawn),
        "jsonl_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "render": gen.render_settings(),
    }
    jsonl, manifest_path = out_dir / f"{split}.jsonl", out_dir / f"{split}.manifest.json"
    images = [out_dir / qs[0].images[0] for _, qs in drawn]
    if (
        manifest_path.is_file()
        and jsonl.is_file()
        and json.loads(manifest_path.read_text()) == manifest
        and hashlib.sha256(jsonl.read_bytes()).hexdigest() == manifest["jsonl_sha256"]
        and all(p.is_file() for p in images)
    ):
        return jsonl  # same content already on disk
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    manifest_path.unlink(missing_ok=True)  # written last: its presence means the split is complete
    for stale in (out_dir / "images").glob(f"{split}-*.png"):
        stale.unlink()
    for (scene, _), path in zip(drawn, images):
        gen.render(scene).save(path, format="PNG")
    tmp = jsonl.with_suffix(".jsonl.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, jsonl)
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    return jsonl


def write_synthetic_split(out_dir: str | os.PathLike[str], n: int, seed: int = 0, split: str = "train",
                          **kw: Any) -> Path:
    """Write `n` questions to `out_dir/<split>.jsonl` plus their images; returns the JSONL path.

    `kw` goes to `SceneGenerator`. Does nothing when the same content is already there.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return _write_split(out, split, SceneGenerator(seed=seed, **kw), n)


def write_synthetic_dataset(out_dir: str | os.PathLike[str], n_train: int, n_val: int, n_test: int,
                            seed: int = 0, **kw: Any) -> dict[str, Path]:
    """Write train/val/test splits whose scenes are disjoint (one generator stream, no repeated layout)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = SceneGenerator(seed=seed, **kw)
    return {split: _write_split(out, split, gen, n) for split, n in (("train", n_train), ("val", n_val),
                                                                      ("test", n_test))}

