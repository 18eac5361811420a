"""Reading image files: any mode to RGB, EXIF orientation applied, and a fast check that a file decodes.

torchvision's `ImageFolder` loader is `Image.open(f).convert("RGB")`. That is wrong for three kinds
of photo a user folder holds:
- 16-bit images (PNG scans, medical, microscopy): `convert` clips every value above 255 to white;
  here values are scaled into 0..255;
- transparent images (RGBA, LA, palette with transparency): `convert` keeps whatever colour the
  invisible pixels hold; here they are composited on white, so the pixels are defined;
- phone photos: the camera stores them sideways with an EXIF orientation tag; here they are turned.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# suffixes read as images (compared lower-case); other files in class folders are ignored
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # more than 8 bits per pixel


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB (see the module doc for what differs from `convert("RGB")`)."""
    if image.mode == "RGB":
        return image
    if image.mode in WIDE_MODES:
        # by the mode's range, the same for every image of a data set: I;16 is 0..65535 (12-bit data
        # stored in 16-bit files comes out dark: rescale such files beforehand); I (32-bit integers)
        # and F (floats) carry no range, so values above 255 are taken as 16-bit, floats up to 1 as [0, 1]
        values = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or (image.mode == "I" and values.size and values.max() > 255):
            values = values / 257.0
        elif image.mode == "F" and values.size and np.nanmax(values) <= 1.0:
            values = values * 255.0
        gray = np.clip(np.nan_to_num(values), 0, 255).round().astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def upright(image: Image.Image) -> Image.Image:
    """`image` (already decoded) turned as its EXIF orientation says."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block: keep the pixels as stored rather than fail the image
        return image


def load_image(path: str | Path) -> Image.Image:
    """The image at `path`, upright, as RGB. Decoded in full first, so a broken file raises here."""
    with Image.open(path) as im:
        im.load()
        return to_rgb(upright(im))


def check_image(path: str | Path) -> str | None:
    """None when `path` decodes as an image, else the reason (one line).

    A JPEG is decoded at 1/8 scale (`draft`): every byte of its compressed data is still read, so a
    truncated or corrupt file fails as it would in training, about 1.6-2x faster than a full decode
    on detailed photos (benchmarks/RESULTS.md).
    """
    try:
        with Image.open(path) as im:
            if im.format == "JPEG":
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
            to_rgb(im)
        return None
    except FileNotFoundError:
        return "no such file"
    except Exception as e:  # PIL raises many types: UnidentifiedImageError, OSError, SyntaxError, ValueError, ...
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        return reason.replace(str(path), "").strip(" '") or type(e).__name__


def check_files(paths: list[str], workers: int = 1, progress: bool = True) -> dict[str, str]:
    """{path: reason} for the files of `paths` that do not decode, checked on `workers` threads
    (Pillow releases the GIL while decoding) behind a progress bar."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    bar = tqdm(total=len(paths), desc="checking images", unit="img", disable=not progress or None, leave=False)
    bad: dict[str, str] = {}
    with bar, ThreadPoolExecutor(max(1, workers)) as pool:
        for path, reason in zip(paths, pool.map(check_image, paths)):
            if reason is not None:
                bad[path] = reason
            bar.update()
    return bad
