"""`SceneGenerator`: seeded scenes on a grid of anatomies and SGG-VQA-style questions about them.

At the default 56 px and 2x2 grid every region is exactly one merged Qwen2.5-VL visual token (two
14 px patches each way), so a network of a few million parameters can see what it needs. The
vocabulary and looks of each benchmark are in `looks`.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from anatomy_lightning.data.schema import MAX_OPTIONS, MIN_OPTIONS, Question
from anatomy_lightning.data.synthetic.looks import (
    ANATOMIES,
    BENCHMARKS,
    BY_NAME,
    V2_GAIN,
    V2_LOOKS,
    V2_TINT_SIGMA,
    V3_AMBIGUOUS,
    V3_ANATOMIES,
    V3_BY_NAME,
    V3_CLEAR,
    V3_HARD_SHARE,
    Anatomy,
)

__all__ = [
    "FORMAT_VERSION",
    "KINDS",
    "RELATIONS",
    "TEXTURE_DEPTH",
    "TOOL_NAME",
    "TOOL_RGB",
    "Scene",
    "SceneGenerator",
    "position_name",
]

FORMAT_VERSION = 1  # bump when rendering or question generation changes, so old files are rewritten

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
        # v2: always every kin that fits, so S(q) follows the gold (see `looks`)
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
