"""Draws docs/benchmark_v2/looks.png: four frames of every anatomy, v1 against v2.

    PYTHONPATH=. python docs/benchmark_v2/looks.py
"""

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from anatomy_lightning.data.synthetic import ANATOMIES, Scene, SceneGenerator  # noqa: E402

FRAMES = 4


def panel(benchmark: str) -> np.ndarray:
    gen = SceneGenerator(grid=1, kinds=("position",), questions_per_scene=1, unique_scenes=False, benchmark=benchmark)
    rows = []
    for i, a in enumerate(ANATOMIES):
        tiles = [np.asarray(gen.render(Scene("x", 1, (a.name,), None, 101 * i + 7 * f + 1))) for f in range(FRAMES)]
        rows.append(np.concatenate([np.pad(t, ((1, 1), (1, 1), (0, 0)), constant_values=255) for t in tiles], 1))
    return np.concatenate(rows, 0)


fig, axes = plt.subplots(1, 2, figsize=(6.4, 8.5), dpi=80)
for ax, bm in zip(axes, ("v1", "v2")):
    img = panel(bm)
    ax.imshow(img, interpolation="nearest")
    ax.set_title(f"benchmark {bm}", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([58 * i + 29 for i in range(len(ANATOMIES))])
    ax.set_yticklabels([f"{a.name} ({a.family})" for a in ANATOMIES] if bm == "v1" else [], fontsize=7)
fig.tight_layout()
buf = io.BytesIO()
fig.savefig(buf, format="png")
Image.open(buf).convert("RGB").quantize(64).save(Path(__file__).with_name("looks.png"), optimize=True)  # small PNG
