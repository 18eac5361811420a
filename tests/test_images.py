"""Reading image files as users have them: every mode to RGB, EXIF orientation, and the decode check."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from lightning_project.data.images import check_files, check_image, load_image


def _rgb(w=24, h=16, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3)).astype(np.uint8))


def test_every_mode_becomes_8_bit_rgb(tmp_path):
    gray16 = np.full((8, 8), 40000, dtype=np.uint16)  # 40000/65535 of full scale
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    rgba = Image.new("RGBA", (8, 8), (10, 200, 30, 0))  # fully transparent green
    rgba.putpixel((0, 0), (10, 200, 30, 255))
    rgba.save(tmp_path / "rgba.png")
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "p.png", transparency=0)
    _rgb().convert("L").save(tmp_path / "gray.jpg")
    _rgb().convert("CMYK").save(tmp_path / "cmyk.jpg")
    _rgb().convert("LA").save(tmp_path / "la.png")

    for name in ("g16.png", "rgba.png", "p.png", "gray.jpg", "cmyk.jpg", "la.png"):
        image = load_image(tmp_path / name)
        assert image.mode == "RGB", name
    assert load_image(tmp_path / "g16.png").getpixel((0, 0)) == (156, 156, 156)  # scaled, not clipped to 255
    dim = np.full((8, 8), 1028, dtype=np.uint16)
    dim[0, 0] = 300  # the image's brightest pixel decides nothing: every 16-bit file scales alike
    Image.fromarray(dim).save(tmp_path / "dim16.png")
    assert load_image(tmp_path / "dim16.png").getpixel((1, 1)) == (4, 4, 4)
    composited = load_image(tmp_path / "rgba.png")
    assert composited.getpixel((5, 5)) == (255, 255, 255)  # invisible pixels on white, not their hidden green
    assert composited.getpixel((0, 0)) == (10, 200, 30)
    assert load_image(tmp_path / "p.png").getpixel((0, 0)) == (255, 255, 255)  # palette transparency honoured


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    _rgb(w=30, h=10).save(tmp_path / "phone.jpg", exif=exif.tobytes())
    assert load_image(tmp_path / "phone.jpg").size == (10, 30)


def test_check_image_names_what_is_wrong(tmp_path):
    buffer = io.BytesIO()
    _rgb(64, 64).save(buffer, "JPEG", quality=95)
    data = buffer.getvalue()
    (tmp_path / "good.jpg").write_bytes(data)
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image at all")
    assert check_image(tmp_path / "good.jpg") is None
    assert "truncated" in check_image(tmp_path / "truncated.jpg")
    assert "cannot identify image file" in check_image(tmp_path / "empty.png")
    assert "cannot identify image file" in check_image(tmp_path / "text.jpg")
    assert check_image(tmp_path / "missing.jpg") == "no such file"

    paths = [str(tmp_path / n) for n in ("good.jpg", "truncated.jpg", "empty.png", "text.jpg")] * 5
    bad = check_files(paths, workers=2, progress=False)
    assert sorted(bad) == sorted({p for p in paths if not p.endswith("good.jpg")})


@pytest.mark.parametrize("mode", ["1", "I", "F"])
def test_rare_modes_do_not_fail(tmp_path, mode):
    array = np.linspace(0, 1 if mode == "F" else 255, 64).reshape(8, 8)
    image = Image.fromarray(array.astype(np.float32)).convert(mode) if mode != "1" else _rgb().convert("1")
    image.save(tmp_path / "x.tiff")
    out = load_image(tmp_path / "x.tiff")
    assert out.mode == "RGB" and max(out.getextrema()[0]) > 200  # the bright end stays bright
