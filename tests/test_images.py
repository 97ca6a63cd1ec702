"""trainers/images.py: what a user's folder can throw at the trainer, and the messages it gets."""

import io
import random
import struct
import zlib

import pytest
from PIL import Image

from trainers import images
from trainers.images import ImageError, check_folder, check_image, load_image

RED, BLUE = (255, 0, 0), (0, 0, 255)


def save(img, path, fmt=None, **kwargs):
    img.save(path, format=fmt, **kwargs)
    return path


def halves(width, height):
    """Left half red, right half blue."""
    img = Image.new("RGB", (width, height), BLUE)
    img.paste(RED, (0, 0, width // 2, height))
    return img


def close(pixel, colour, tol=40):
    return all(abs(a - b) <= tol for a, b in zip(pixel, colour))


@pytest.mark.parametrize("fmt,suffix", [("PNG", ".png"), ("JPEG", ".jpg"), ("WEBP", ".webp")])
def test_supported_formats(tmp_path, fmt, suffix):
    info = check_image(save(halves(96, 80), tmp_path / f"a{suffix}", fmt))
    assert (info.format, info.width, info.height) == (fmt, 96, 80)


def test_content_decides_not_extension(tmp_path):
    assert check_image(save(halves(64, 64), tmp_path / "really_png.jpg", "PNG")).format == "PNG"
    text = tmp_path / "notes.png"
    text.write_text("hello, not an image")
    with pytest.raises(ImageError, match="notes.png: not an image"):
        check_image(text)


def test_unsupported_format(tmp_path):
    with pytest.raises(ImageError, match="GIF images are not supported"):
        check_image(save(halves(64, 64), tmp_path / "a.gif", "GIF"))


def test_truncated_and_corrupt(tmp_path):
    good = save(halves(256, 256), tmp_path / "good.jpg", "JPEG").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(good[: len(good) // 2])
    with pytest.raises(ImageError, match="cut.jpg: the file is truncated"):
        check_image(tmp_path / "cut.jpg")
    png = bytearray(save(halves(128, 128), tmp_path / "x.png", "PNG").read_bytes())
    png[60:90] = b"\x00" * 30  # inside the compressed IDAT stream
    (tmp_path / "bad.png").write_bytes(bytes(png))
    with pytest.raises(ImageError, match="bad.png: the file (is corrupt|is truncated)"):
        check_image(tmp_path / "bad.png")


def png_claiming(width, height):
    """A valid 1x1 PNG whose header claims another size: a decompression bomb's shape."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def test_decompression_bomb(tmp_path, monkeypatch):
    (tmp_path / "bomb.png").write_bytes(png_claiming(100_000, 100_000))
    with pytest.raises(ImageError, match="bomb.png: .*too large"):
        check_image(tmp_path / "bomb.png")
    # Below Pillow's own limit, ours still applies before decoding.
    monkeypatch.setattr(images, "MAX_PIXELS", 100 * 100)
    with pytest.raises(ImageError, match="200x200 is too large"):
        check_image(save(halves(200, 200), tmp_path / "big.png"))


def test_minimum_size(tmp_path):
    with pytest.raises(ImageError, match="small.png: 63x200 is too small; each side needs at least 64 px"):
        check_image(save(halves(63, 200), tmp_path / "small.png"))
    assert check_image(save(halves(64, 200), tmp_path / "ok.png")).width == 64


def test_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown rotated 90 degrees clockwise
    path = save(halves(128, 64), tmp_path / "phone.jpg", "JPEG", exif=exif, quality=95)
    info = check_image(path)
    assert (info.width, info.height) == (64, 128)
    img = load_image(path, 64)
    # Shown upright, the red half is on top; the stored pixels have it on the left.
    assert close(img.getpixel((0, 0)), RED) and close(img.getpixel((63, 0)), RED)
    assert close(img.getpixel((0, 63)), BLUE)


def test_alpha_flattened_onto_white(tmp_path):
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (0, 0, 32, 64))
    info = check_image(save(rgba, tmp_path / "a.png"))
    assert info.has_alpha
    img = load_image(tmp_path / "a.png", 64)
    assert img.mode == "RGB" and img.getpixel((0, 0)) == RED and img.getpixel((63, 0)) == (255, 255, 255)
    pal = Image.new("P", (64, 64), 0)
    pal.putpalette([0, 0, 0, 0, 255, 0])
    pal.info["transparency"] = 0
    assert load_image(save(pal, tmp_path / "p.png", transparency=0), 64).getpixel((5, 5)) == (255, 255, 255)


def test_other_modes_become_rgb(tmp_path):
    for mode, name in [("L", "grey.png"), ("CMYK", "print.jpg"), ("I;16", "deep.png")]:
        img = load_image(save(Image.new(mode, (80, 64)), tmp_path / name), 64)
        assert img.mode == "RGB" and img.size == (64, 64), name


def test_resize_crop_flip(tmp_path):
    path = save(halves(300, 200), tmp_path / "wide.png")
    img = load_image(path, 64)
    assert img.size == (64, 64)
    assert close(img.getpixel((0, 32)), RED) and close(img.getpixel((63, 32)), BLUE)
    flipped = load_image(path, 64, flip=True)
    assert close(flipped.getpixel((0, 32)), BLUE) and close(flipped.getpixel((63, 32)), RED)
    # Random crops move with the generator and repeat with its seed.
    crops = [load_image(path, 64, center_crop=False, rng=random.Random(s)).tobytes() for s in (0, 0, 1, 2, 3)]
    assert crops[0] == crops[1] and len(set(crops)) > 1


def test_file_like_source(tmp_path):
    buf = io.BytesIO()
    halves(70, 90).save(buf, "WEBP")
    buf.seek(0)
    assert check_image(buf).format == "WEBP"


def test_folder(tmp_path):
    with pytest.raises(ImageError, match="does not exist"):
        check_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match="has no images"):
        check_folder(tmp_path / "empty")
    folder = tmp_path / "mixed"
    folder.mkdir()
    save(halves(64, 64), folder / "a.png")
    save(halves(64, 64), folder / "b.jpg", "JPEG")
    (folder / ".DS_Store").write_bytes(b"\x00\x01junk")
    (folder / "sub").mkdir()
    assert [i.path.name for i in check_folder(folder)] == ["a.png", "b.jpg"]
    (folder / "readme.txt").write_text("x")
    save(halves(32, 32), folder / "tiny.png")
    with pytest.raises(ImageError) as err:
        check_folder(folder)
    message = str(err.value)
    assert message.startswith("2 of 4 files") and "readme.txt: not an image" in message and "tiny.png: 32x32" in message
