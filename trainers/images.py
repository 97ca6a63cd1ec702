"""Training images: checking and loading user files safely, one clear message per bad file.

    info = check_image(path)                 # ImageInfo, or ImageError("photo.jpg: the file is truncated ...")
    infos = check_folder(folder)             # every usable image; ImageError listing every bad file
    img = load_image(path, resolution=512, center_crop=True, flip=False)   # RGB PIL image, square

The file's content decides what it is (Pillow sniffs the header), never its extension. A check
decodes the whole image, so a truncated or corrupt file is caught at upload time rather than in
the middle of training. EXIF orientation is applied before anything measures the image (a phone
photo stored sideways is judged and cropped the way it is shown), and transparency is flattened
onto white (a transparent background would otherwise turn black in RGB).
"""

from __future__ import annotations

import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

FORMATS = ("PNG", "JPEG", "WEBP")
MIN_SIDE = 64
# Decompression-bomb guard, checked on the header's size before any pixel is decoded: 50 MP is
# larger than any camera photo a user would upload, far smaller than what exhausts memory.
MAX_PIXELS = 50_000_000


class ImageError(ValueError):
    """An image that cannot be used for training; str() is a message for a person."""

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        super().__init__(message)
        self.path = None if path is None else Path(path)


@dataclass(frozen=True)
class ImageInfo:
    path: Path | None
    format: str  # PNG | JPEG | WEBP, from the content
    width: int  # as displayed (after EXIF orientation)
    height: int
    mode: str  # Pillow mode of the file, e.g. RGB, RGBA, P, L
    has_alpha: bool


def _label(source) -> str:
    return Path(source).name if isinstance(source, (str, os.PathLike)) else getattr(source, "name", "image")


def _open(source: str | os.PathLike | BinaryIO) -> tuple[Image.Image, ImageInfo]:
    """Open, guard, decode fully and orient one image; every failure becomes an ImageError."""
    label = _label(source)
    path = Path(source) if isinstance(source, (str, os.PathLike)) else None
    if path is not None and not path.is_file():
        raise ImageError(f"{label}: no such file", path)
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its own limit and twice it; make every bomb an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as opened:
                fmt, mode = opened.format, opened.mode
                if fmt not in FORMATS:
                    raise ImageError(f"{label}: {fmt} images are not supported; use PNG, JPEG or WebP", path)
                if opened.width * opened.height > MAX_PIXELS:
                    raise ImageError(
                        f"{label}: {opened.width}x{opened.height} is too large ({opened.width * opened.height / 1e6:.0f} MP; "
                        f"the limit is {MAX_PIXELS / 1e6:.0f} MP); scale it down first", path)
                opened.load()
                has_alpha = "A" in opened.getbands() or "transparency" in opened.info
                img = ImageOps.exif_transpose(opened)
    except ImageError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageError(f"{label}: not an image (or a format Pillow cannot read); use PNG, JPEG or WebP", path) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{label}: the image is too large to decode safely; scale it down first", path) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Pillow reports truncation and corrupt streams as OSError/SyntaxError with terse text.
        reason = "the file is truncated" if "truncated" in str(exc) else f"the file is corrupt ({exc})"
        raise ImageError(f"{label}: {reason}; export it again or remove it", path) from None
    info = ImageInfo(path, fmt, img.width, img.height, mode, has_alpha)
    if min(img.width, img.height) < MIN_SIDE:
        raise ImageError(f"{label}: {img.width}x{img.height} is too small; each side needs at least {MIN_SIDE} px", path)
    return img, info


def check_image(source: str | os.PathLike | BinaryIO) -> ImageInfo:
    """Describe an image that training can use, or raise ImageError saying why it cannot."""
    img, info = _open(source)
    img.close()
    return info


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The candidate files of a folder, sorted; hidden files (.DS_Store, ._x.jpg) and folders are skipped."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith("."))


def check_folder(folder: str | os.PathLike) -> list[ImageInfo]:
    """Every image of `folder`, checked; raises one ImageError naming every bad file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageError(f"the image folder {folder} does not exist", folder)
    files = image_files(folder)
    if not files:
        raise ImageError(f"the image folder {folder} has no images; add a few PNG, JPEG or WebP files", folder)
    infos, problems = [], []
    for path in files:
        try:
            infos.append(check_image(path))
        except ImageError as exc:
            problems.append(str(exc))
    if problems:
        raise ImageError(f"{len(problems)} of {len(files)} files in {folder} cannot be used:\n  " + "\n  ".join(problems), folder)
    return infos


def to_8bit(img: Image.Image) -> Image.Image:
    """16-bit grayscale (Pillow's I;16 modes, or I) scaled to 8-bit L: Pillow's own convert clips
    such values at 255, which turns almost every pixel white. 16-bit RGB PNGs already open as
    8-bit RGB."""
    if not img.mode.startswith("I"):
        return img
    levels = np.asarray(img, dtype=np.float64) / 257.0
    return Image.fromarray(np.clip(np.rint(levels), 0, 255).astype(np.uint8), "L")


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white."""
    img = to_8bit(img)
    if "A" in img.getbands() or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


# PIL's filters by the names of torchvision's InterpolationMode (torchvision maps them so for PIL images).
RESAMPLING = {"nearest": Image.Resampling.NEAREST, "nearest_exact": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
              "bicubic": Image.Resampling.BICUBIC, "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING,
              "lanczos": Image.Resampling.LANCZOS}


def load_resized(source: str | os.PathLike | BinaryIO, resolution: int, interpolation: str = "lanczos") -> Image.Image:
    """The image in RGB with its shorter side resized to `resolution` (with the RESAMPLING filter
    named `interpolation`), not yet cropped."""
    img, _ = _open(source)
    img = to_rgb(img)
    scale = resolution / min(img.width, img.height)
    size = (max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale)))
    return img.resize(size, RESAMPLING[interpolation])


def original_size(source: str | os.PathLike | BinaryIO) -> tuple[int, int]:
    """(height, width) of the image as oriented (EXIF), before any resizing."""
    img, _ = _open(source)
    return img.height, img.width


def load_image(source: str | os.PathLike | BinaryIO, resolution: int, center_crop: bool = True, flip: bool = False,
               rng: random.Random | None = None) -> Image.Image:
    """A resolution x resolution RGB training image: the shorter side resized to `resolution`
    (Lanczos), then a center or (with `rng`) random crop, mirrored if `flip`.
    """
    img = load_resized(source, resolution)
    if center_crop:
        left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
    else:
        rng = rng or random
        left, top = rng.randint(0, img.width - resolution), rng.randint(0, img.height - resolution)
    img = img.crop((left, top, left + resolution, top + resolution))
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img
