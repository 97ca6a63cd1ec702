"""The shapes-world evaluator: a small CNN that reads shape, colour and background.

It scores generated images against what a prompt asked for, so concept fidelity,
prompt fidelity and preservation can be measured without a human. It is trained
(by scripts/build_demo_model.py) on clean renders AND on the demo VAE's
reconstructions, because every generated sample passes through that VAE.

API (kept small on purpose; the quality benchmark imports it):
    ev = Evaluator.load("assets/evaluator")
    preds = ev.predict(images)          # [{"shape": ..., "colour": ..., "background": ...}, ...]
    ev.score(images, expected)          # {"shape": acc, "colour": acc, "background": acc, "n": n}
    ev.save(folder)
images: a list of PIL images or a uint8/float array [N, 64, 64, 3] (float in [0, 1]).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

ATTRIBUTES = ("shape", "colour", "background")


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())


class ShapeClassifier(nn.Module):
    """Conv trunk (64 -> 4 px) + global average pool + one linear head per attribute."""

    def __init__(self, labels: dict[str, list[str]], width: int = 32):
        super().__init__()
        w = width
        # Stride 2 from the first layer: full-resolution convs would cost ~10x for no accuracy.
        self.trunk = nn.Sequential(
            _block(3, w, 2), _block(w, 2 * w, 2), _block(2 * w, 2 * w, 1),
            _block(2 * w, 4 * w, 2), _block(4 * w, 4 * w, 1), _block(4 * w, 4 * w, 2),
        )
        self.heads = nn.ModuleDict({a: nn.Linear(4 * w, len(labels[a])) for a in ATTRIBUTES})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: float [N, 3, 64, 64] in [-1, 1]; returns logits per attribute."""
        h = self.trunk(x).mean(dim=(2, 3))
        return {a: head(h) for a, head in self.heads.items()}


def to_tensor(images) -> torch.Tensor:
    """PIL list / uint8 array / float [0,1] array, NHWC -> float tensor NCHW in [-1, 1]."""
    if isinstance(images, (list, tuple)):
        images = np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im)
                           for im in images])
    arr = np.asarray(images)
    x = torch.from_numpy(arr.astype(np.float32))
    if arr.dtype == np.uint8:
        x = x / 255.0
    return x.permute(0, 3, 1, 2) * 2 - 1


class Evaluator:
    """A trained ShapeClassifier plus its label names."""

    def __init__(self, labels: dict[str, list[str]], width: int = 32, model: ShapeClassifier | None = None):
        self.labels = {a: list(labels[a]) for a in ATTRIBUTES}
        self.width = width
        self.model = model or ShapeClassifier(self.labels, width)
        self.model.eval()

    @classmethod
    def load(cls, folder: str | Path) -> "Evaluator":
        folder = Path(folder)
        cfg = json.loads((folder / "config.json").read_text())
        ev = cls(cfg["labels"], cfg["width"])
        ev.model.load_state_dict(load_file(folder / "model.safetensors"))
        ev.model.eval()
        return ev

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()},
                  folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps(
            {"labels": self.labels, "width": self.width, "image_size": 64}, indent=2))

    @torch.no_grad()
    def probabilities(self, images, batch_size: int = 256) -> dict[str, np.ndarray]:
        """Softmax probabilities per attribute, arrays [N, n_labels]."""
        x = to_tensor(images)
        out = {a: [] for a in ATTRIBUTES}
        for i in range(0, len(x), batch_size):
            logits = self.model(x[i:i + batch_size])
            for a in ATTRIBUTES:
                out[a].append(logits[a].softmax(-1))
        return {a: torch.cat(v).numpy() for a, v in out.items()}

    def predict(self, images) -> list[dict[str, str]]:
        """The most likely shape, colour and background of each image."""
        p = self.probabilities(images)
        idx = {a: p[a].argmax(-1) for a in ATTRIBUTES}
        return [{a: self.labels[a][idx[a][i]] for a in ATTRIBUTES} for i in range(len(idx["shape"]))]

    def score(self, images, expected) -> dict[str, float]:
        """Per-attribute accuracy against what was asked for.

        expected: one item per image, a dict with any of shape/colour/background or a
        (shape, colour, background) tuple; None for an attribute means "not asked" and
        that image is left out of that attribute's accuracy (None when nothing was asked).
        """
        preds = self.predict(images)
        hits = {a: [] for a in ATTRIBUTES}
        for pred, exp in zip(preds, expected, strict=True):
            exp = exp if isinstance(exp, dict) else dict(zip(ATTRIBUTES, exp))
            for a in ATTRIBUTES:
                if exp.get(a) is not None:
                    hits[a].append(pred[a] == exp[a])
        res = {a: (float(np.mean(h)) if h else None) for a, h in hits.items()}
        res["n"] = len(preds)
        return res
