"""Synthetic splits on disk: JSONL questions, PNG frames, and a manifest so a repeated call skips the work.

`write_synthetic_split` writes `<split>.jsonl` (one `Question.to_record()` per line, image
paths relative to the JSONL's folder), `images/<split>-<scene>.png` (questions of one scene share
it) and `<split>.manifest.json`, which lets a second call with the same content skip all work.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from anatomy_lightning.data.synthetic.scenes import SceneGenerator

__all__ = ["write_synthetic_dataset", "write_synthetic_split"]


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

