"""load_image gives 8-bit RGB for every mode medical datasets use; bad files raise DataError naming the path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anatomy_lightning.data.images import check_image, load_image, to_rgb
from anatomy_lightning.data.schema import DataError


def saved(img: Image.Image, path: Path) -> Path:
    img.save(path)
    return path


def pixels(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img)


def test_rgb_png_round_trip(tmp_path: Path):
    src = Image.new("RGB", (4, 3), (10, 200, 30))
    img = load_image(saved(src, tmp_path / "a.png"))
    assert img.size == (4, 3) and pixels(img)[0, 0].tolist() == [10, 200, 30]


def test_cmyk_jpeg(tmp_path: Path):
    img = load_image(saved(Image.new("CMYK", (8, 8), (0, 0, 0, 0)), tmp_path / "c.jpg"))
    assert pixels(img).min() > 240  # no ink is white, not black


def test_16_bit_greyscale_is_stretched_not_clipped(tmp_path: Path):
    arr = np.array([[0, 1024], [2048, 4095]], np.uint16)  # 12-bit data in a 16-bit PNG (X-ray style)
    path = saved(Image.fromarray(arr), tmp_path / "xray.png")
    assert Image.open(path).mode in ("I;16", "I")
    out = pixels(load_image(path))
    assert out[..., 0].tolist() == [[0, 64], [128, 255]]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_32_bit_integer_and_float_modes():
    ints = Image.fromarray(np.array([[-1000, 0], [500, 3000]], np.int32), "I")  # CT-like Hounsfield units
    assert pixels(to_rgb(ints))[..., 0].tolist() == [[0, 64], [96, 255]]
    flat = Image.fromarray(np.full((2, 2), 7.0, np.float32), "F")
    assert pixels(to_rgb(flat)).max() == 7  # a flat image keeps its level


def test_greyscale_and_binary(tmp_path: Path):
    img = load_image(saved(Image.new("L", (2, 2), 77), tmp_path / "l.png"))
    assert pixels(img)[0, 0].tolist() == [77, 77, 77]
    assert pixels(to_rgb(Image.new("1", (2, 2), 1)))[0, 0].tolist() == [255, 255, 255]


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparency_composites_on_white(tmp_path: Path, mode: str):
    src = Image.new(mode, (2, 1), (0, 0, 0, 0) if mode == "RGBA" else (0, 0))
    src.putpixel((1, 0), (255, 0, 0, 255) if mode == "RGBA" else (50, 255))
    out = pixels(load_image(saved(src, tmp_path / "t.png")))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == ([255, 0, 0] if mode == "RGBA" else [50, 50, 50])


def test_palette_with_and_without_transparency(tmp_path: Path):
    pal = Image.new("P", (2, 1), 0)
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((1, 0), 1)
    assert pixels(load_image(saved(pal, tmp_path / "p.png")))[0].tolist() == [[0, 0, 0], [0, 0, 255]]
    pal.info["transparency"] = 0
    assert pixels(load_image(saved(pal, tmp_path / "pt.png")))[0].tolist() == [[255, 255, 255], [0, 0, 255]]


def test_corrupt_and_truncated_files_raise_dataerror_with_path(tmp_path: Path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not an image at all")
    with pytest.raises(DataError, match=r"junk\.png: cannot read the image \(UnidentifiedImageError"):
        load_image(junk)
    good = saved(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)), tmp_path / "g.png")
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataError, match=r"cut\.png: cannot read the image .*corrupt"):
        load_image(cut)
    assert "junk.png: not a readable image" in check_image(junk)


def test_missing_file(tmp_path: Path):
    with pytest.raises(DataError, match=r"nope\.png: image file not found"):
        load_image(tmp_path / "nope.png")
    assert check_image(tmp_path / "nope.png") == f"{tmp_path / 'nope.png'}: image file not found"


def test_check_image_accepts_good_files(tmp_path: Path):
    assert check_image(saved(Image.new("RGB", (2, 2)), tmp_path / "ok.png")) is None
