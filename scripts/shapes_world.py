"""A procedural, captioned world of coloured shapes for the bundled demo model.

Every image is 64x64 RGB: one shape in one colour on a background of a different
colour, with size, position, rotation and slight colour jitter. Rendering is
analytic (signed-distance style masks at 2x supersampling, then box-downsampled),
so it is deterministic, anti-aliased and needs no data download.

Star and heart are HELD_OUT: the pretraining sampler never draws them, so they are
genuinely new concepts for DreamBooth-style tuning later.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

SIZE = 64
_SS = 2  # supersampling factor for anti-aliased edges

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")
HELD_OUT = ("star", "heart")
ALL_SHAPES = SHAPES + HELD_OUT

# Well separated colours, so colour names are unambiguous after a lossy VAE.
COLOURS = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 50, 180),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
COLOUR_NAMES = tuple(COLOURS)
BACKGROUNDS = COLOUR_NAMES  # any colour can be a background, never the shape's own

# Caption templates (weights). Variants drop colour or background or name a generic
# "shape", so prompts such as "a sks shape in green on a yellow background" are in-domain.
_TEMPLATES = (
    ("a {c} {s} on a {b} background", 0.40),
    ("a {s} in {c} on a {b} background", 0.10),
    ("a {c} shape on a {b} background", 0.08),
    ("a shape in {c} on a {b} background", 0.04),
    ("a {s} on a {b} background", 0.10),
    ("a {c} {s}", 0.10),
    ("a {s}", 0.06),
    ("", 0.07),  # empty captions train the unconditional branch for classifier-free guidance
    ("a {b} background", 0.05),
)
_TPL_P = np.array([w for _, w in _TEMPLATES]) / sum(w for _, w in _TEMPLATES)

# Every word the tokenizer must know as one token, including the DreamBooth rare token.
VOCAB_WORDS = sorted(set(
    list(ALL_SHAPES) + list(COLOUR_NAMES)
    + "a an the on in of with and background shape sks photo picture image drawing".split()
    + "big small large tiny left right top bottom center middle corner dog cat".split()
))


def full_caption(shape: str, colour: str, background: str) -> str:
    """The canonical caption, e.g. 'a red circle on a blue background'."""
    return f"a {colour} {shape} on a {background} background"


def random_caption(shape: str, colour: str, background: str, rng: np.random.Generator) -> str:
    """One caption variant for training, drawn with the template weights above."""
    tpl = _TEMPLATES[rng.choice(len(_TEMPLATES), p=_TPL_P)][0]
    return tpl.format(s=shape, c=colour, b=background)


def _mask(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Boolean mask of a unit-size shape centred at 0 (x right, y down, radius ~1)."""
    ax, ay = np.abs(x), np.abs(y)
    if shape == "circle":
        return x * x + y * y <= 1.0
    if shape == "ring":
        r2 = x * x + y * y
        return (r2 <= 1.0) & (r2 >= 0.55 ** 2)
    if shape == "square":
        return (ax <= 0.82) & (ay <= 0.82)
    if shape == "diamond":
        return ax + ay <= 1.0
    if shape == "cross":
        return ((ax <= 0.3) & (ay <= 1.0)) | ((ay <= 0.3) & (ax <= 1.0))
    if shape == "triangle":  # point up, base at y=0.75
        return (y <= 0.75) & (y >= -1.0) & (ax <= (y + 1.0) / 1.75 * 1.0)
    if shape == "star":  # five-pointed, point up
        ang = np.arctan2(x, -y)
        r = np.sqrt(x * x + y * y)
        k = np.pi / 5
        a = np.abs(np.mod(ang, 2 * k) - k)  # angle from the nearest point's axis
        inner = 0.5
        # Inside if on the centre's side of the edge from the point (1, 0) to the notch.
        qx, qy = inner * np.cos(k), inner * np.sin(k)
        rx, ry = r * np.cos(a), r * np.sin(a)
        return (qx - 1.0) * ry - qy * (rx - 1.0) >= 0
    if shape == "heart":
        # Classic implicit heart, flipped so the point is at the bottom.
        hx, hy = x * 1.15, -(y * 1.15) + 0.15
        return (hx * hx + hy * hy - 1.0) ** 3 - hx * hx * hy ** 3 <= 0.0
    raise ValueError(f"unknown shape {shape!r}")


def render(shape: str, colour: str, background: str,
           rng: np.random.Generator | int | None = None, jitter: bool = True):
    """Render one image and its canonical caption.

    rng: a numpy Generator or int seed for the jitter (None means seed 0).
    jitter=False gives a centred, medium-size, upright, exact-colour image.
    Returns (PIL.Image 64x64 RGB, caption).
    """
    if colour == background:
        raise ValueError("shape colour and background must differ")
    rng = np.random.default_rng(rng if rng is not None else 0)
    if jitter:
        radius = rng.uniform(0.22, 0.36) * SIZE
        cx = rng.uniform(radius + 1, SIZE - radius - 1)
        cy = rng.uniform(radius + 1, SIZE - radius - 1)
        theta = np.deg2rad(rng.uniform(-12, 12))
        fg = np.clip(np.array(COLOURS[colour]) + rng.integers(-12, 13, 3), 0, 255)
        bg = np.clip(np.array(COLOURS[background]) + rng.integers(-12, 13, 3), 0, 255)
    else:
        radius, cx, cy, theta = 0.3 * SIZE, SIZE / 2, SIZE / 2, 0.0
        fg, bg = np.array(COLOURS[colour]), np.array(COLOURS[background])
    n = SIZE * _SS
    g = (np.arange(n) + 0.5) / _SS
    yy, xx = np.meshgrid(g, g, indexing="ij")
    dx, dy = (xx - cx) / radius, (yy - cy) / radius
    c, s = np.cos(theta), np.sin(theta)
    m = _mask(shape, c * dx + s * dy, -s * dx + c * dy).astype(np.float32)
    m = m.reshape(SIZE, _SS, SIZE, _SS).mean(axis=(1, 3))[..., None]
    img = m * fg + (1 - m) * bg
    return Image.fromarray(np.round(img).astype(np.uint8)), full_caption(shape, colour, background)


def sample_attributes(rng: np.random.Generator, shapes=SHAPES):
    """Draw (shape, colour, background) uniformly, with background != colour."""
    shape = shapes[rng.integers(len(shapes))]
    colour = COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
    others = [b for b in BACKGROUNDS if b != colour]
    return shape, colour, others[rng.integers(len(others))]


def sample_dataset(seed: int, n: int, shapes=SHAPES, captions: bool = True):
    """Deterministic list of n examples from a seed, pretraining shapes by default.

    Returns (images uint8 array [n,64,64,3], attributes list of (shape, colour, bg),
    captions list of str - random caption variants, or [] if captions=False).
    """
    rng = np.random.default_rng(seed)
    imgs = np.empty((n, SIZE, SIZE, 3), np.uint8)
    attrs, caps = [], []
    for i in range(n):
        a = sample_attributes(rng, shapes)
        img, _ = render(*a, rng=rng)
        imgs[i] = np.asarray(img)
        attrs.append(a)
        if captions:
            caps.append(random_caption(*a, rng))
    return imgs, attrs, caps
