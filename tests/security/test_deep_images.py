"""16-bit PNGs are scaled to 8 bits, not clipped to white (issue 13, item 11), in the trainer's
loader that the studio and the command line share."""

import numpy as np
from PIL import Image

from trainers.images import check_image, load_image


def test_a_16_bit_grayscale_png_keeps_its_tones(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode == "I;16" and check_image(path).format == "PNG"
    pixels = np.asarray(load_image(path, 64))
    assert pixels.shape == (64, 64, 3)
    assert (pixels == 255).mean() < 0.01, "not clipped to white"
    assert abs(pixels.mean() - 127.5) < 2 and pixels.min() == 0
    assert np.abs(pixels[..., 0].astype(int) - np.rint(ramp / 257)).max() <= 1
