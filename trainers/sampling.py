"""Side-by-side sampling: the same prompt and seed through several tuners (the paper's Fig. 6-7).

All columns that can be routed per sample (Res-Tuners, the bound adapter/prefix/prompt
baselines, Bypasses) go through the backbone as ONE batched pipeline call: column i is batch
slice i, `restuning.route` sends each slice through its own tuner, and every slice starts from
the same noise (one generator per slice, same seed). Methods that cannot be routed per sample
(LoRA, whose peft layers have no per-sample switch in a diffusers U-Net; full fine-tuning, which
is a different U-Net) get a pass of their own.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

import restuning

SCHEDULERS = {
    "DPM++ 2M": "DPMSolverMultistepScheduler",
    "Euler": "EulerDiscreteScheduler",
    "Euler a": "EulerAncestralDiscreteScheduler",
    "DDIM": "DDIMScheduler",
    "PLMS": "PNDMScheduler",  # the paper's sampler (Table 11)
}
PNG_KEY = "restuning"
MAX_LOADED_TUNERS = 16


class SamplingError(RuntimeError):
    """A render that cannot be done as asked; the message says what to change."""


def out_of_memory_message(device, batch: int) -> str:
    free = ""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        free_bytes, total = torch.cuda.mem_get_info(device)
        free = f" ({free_bytes / 2**30:.1f} of {total / 2**30:.1f} GiB free now)"
    return (f"the {device.type.upper()} ran out of memory while sampling{free}. A training run on the same device holds "
            f"most of it: wait for it to finish or cancel it; or render fewer columns at once (this batch had "
            f"{batch}), fewer or smaller images.")


def inference_dtype(device) -> torch.dtype:
    """What sampling runs in: half precision on a GPU (bf16 where the card has it, whose range
    needs no care with SD's VAE; else fp16), fp32 on a CPU, where half precision is slower."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@dataclass
class Column:
    """One column of a grid: the base model (no path), a tuner file, or a full fine-tune's unet/ folder."""

    label: str
    tuner: Path | None = None
    unet_dir: Path | None = None
    scale: float = 1.0
    caption: list[str] = field(default_factory=list)


@dataclass
class Settings:
    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 25
    guidance: float = 3.5
    scheduler: str = "DPM++ 2M"
    height: int | None = None
    width: int | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class Sampler:
    """Holds one base pipeline and the tuners loaded into its U-Net; renders grids."""

    def __init__(self, pipe, rows_per_call: int = 1):
        self.pipe = pipe
        # A column of its own (LoRA, full fine-tuning) renders up to this many rows per pipeline
        # call, each row with its own prompt and seeded generator (the same starting noise as a
        # call of its own); 1 keeps one call per row.
        self.rows_per_call = max(1, int(rows_per_call))
        self._names: OrderedDict[str, str] = OrderedDict()  # tuner file key -> attached name
        self._lock = threading.Lock()

    # -- tuners -------------------------------------------------------------------------------

    def _attach(self, path: Path) -> str:
        stat = path.stat()
        key = f"{path.resolve()}:{stat.st_mtime_ns}:{stat.st_size}"
        if key in self._names:
            self._names.move_to_end(key)
            return self._names[key]
        name = "t" + hashlib.sha1(key.encode()).hexdigest()[:12]
        # the text encoders for a LoRA that tunes them too (set_scale then switches all on and off)
        restuning.load(self.pipe.unet, path, name=name, text_encoder=self.pipe.text_encoder,
                       text_encoder_2=getattr(self.pipe, "text_encoder_2", None))
        self._names[key] = name
        while len(self._names) > MAX_LOADED_TUNERS:
            _, old = self._names.popitem(last=False)
            restuning.detach(self.pipe.unet, old)
        return name

    # -- rendering ----------------------------------------------------------------------------

    def render(self, columns: list[Column], rows: list[Settings], progress: Callable[[float, str], None] | None = None) -> list[list[Image.Image]]:
        """Images as rows x columns; each row is one Settings (a prompt and seed), each column a tuner."""
        with self._lock:
            names = [self._attach(c.tuner) if c.tuner is not None else None for c in columns]
            # Tuners of earlier grids stay loaded (a cache), at the scale they rendered with.
            # Routing leaves the routable ones out of this grid, but a LoRA acts on every sample:
            # switch off each one this grid does not show.
            for name in set(self._names.values()) - set(names):
                restuning.set_scale(self.pipe.unet, 0.0, name=name)
            table = restuning.attached(self.pipe.unet)
            routable = [i for i, (c, n) in enumerate(zip(columns, names)) if c.unet_dir is None and (n is None or table[n].routable)]
            solo = [i for i in range(len(columns)) if i not in routable]
            passes = len(rows) * ((1 if routable else 0) + len(solo))
            done = [0]

            def tick(label):
                def on_step(pipe, step, timestep, kwargs):
                    if progress is not None:
                        progress((done[0] + (step + 1) / pipe.num_timesteps) / max(passes, 1), label)
                    return kwargs
                return on_step

            grid: list[list[Image.Image | None]] = [[None] * len(columns) for _ in rows]
            try:
                if routable:
                    self._set_scales(columns, names, active=routable)
                    for r, settings in enumerate(rows):
                        with restuning.route([names[i] for i in routable]):
                            images = self._call(settings, len(routable), tick(f"row {r + 1}: {len(routable)} columns in one batch"))
                        for i, image in zip(routable, images):
                            grid[r][i] = image
                        done[0] += 1
                # A column of its own renders all its rows in one go: a full fine-tune's U-Net is
                # read from disk once per render, not once per row.
                for i in solo:
                    self._set_scales(columns, names, active=[i])
                    with self._unet_of(columns[i]), restuning.route([names[i]]):
                        for chunk in self._chunks(rows):
                            images = self._call_rows([rows[r] for r in chunk], tick(f"rows {chunk[0] + 1}-{chunk[-1] + 1}: {columns[i].label}"))
                            for r, image in zip(chunk, images):
                                grid[r][i] = image
                            done[0] += len(chunk)
            except torch.OutOfMemoryError:
                raise SamplingError(out_of_memory_message(self.pipe.device, len(routable))) from None
            finally:
                self._set_scales(columns, names, active=range(len(columns)))
            return grid

    def _set_scales(self, columns, names, active) -> None:
        active = set(active)
        for i, (column, name) in enumerate(zip(columns, names)):
            if name is not None:
                restuning.set_scale(self.pipe.unet, column.scale if i in active else 0.0, name=name)

    def _unet_of(self, column: Column):
        return _SwapUnet(self.pipe, column.unet_dir)

    def _chunks(self, rows: list[Settings]) -> list[list[int]]:
        """Row indices grouped into pipeline calls: consecutive rows that differ only in prompt
        and seed, at most rows_per_call of them."""
        chunks: list[list[int]] = []
        for r, settings in enumerate(rows):
            shared = {k: v for k, v in settings.to_dict().items() if k not in ("prompt", "seed")}
            if chunks and len(chunks[-1]) < self.rows_per_call and shared == {
                    k: v for k, v in rows[chunks[-1][0]].to_dict().items() if k not in ("prompt", "seed")}:
                chunks[-1].append(r)
            else:
                chunks.append([r])
        return chunks

    def _call_rows(self, rows: list[Settings], on_step) -> list[Image.Image]:
        if len(rows) == 1:
            return self._call(rows[0], 1, on_step)
        first = rows[0]
        self.pipe.scheduler = scheduler_from_name(first.scheduler, self.pipe.scheduler.config)
        out = self.pipe(
            prompt=[r.prompt for r in rows],
            negative_prompt=[first.negative_prompt] * len(rows) if first.negative_prompt else None,
            num_inference_steps=int(first.steps),
            guidance_scale=float(first.guidance),
            generator=[torch.Generator(device="cpu").manual_seed(int(r.seed)) for r in rows],
            height=first.height,
            width=first.width,
            callback_on_step_end=on_step,
        )
        return out.images

    def _call(self, settings: Settings, batch: int, on_step) -> list[Image.Image]:
        self.pipe.scheduler = scheduler_from_name(settings.scheduler, self.pipe.scheduler.config)
        generators = [torch.Generator(device="cpu").manual_seed(int(settings.seed)) for _ in range(batch)]
        out = self.pipe(
            prompt=[settings.prompt] * batch,
            negative_prompt=[settings.negative_prompt] * batch if settings.negative_prompt else None,
            num_inference_steps=int(settings.steps),
            guidance_scale=float(settings.guidance),
            generator=generators,
            height=settings.height,
            width=settings.width,
            callback_on_step_end=on_step,
        )
        return out.images


class _SwapUnet:
    """Within the block, the pipeline uses the full fine-tune's U-Net from `unet_dir` (if any)."""

    def __init__(self, pipe, unet_dir: Path | None):
        self.pipe, self.unet_dir, self.saved = pipe, unet_dir, None

    def __enter__(self):
        if self.unet_dir is not None:
            from diffusers import UNet2DConditionModel

            self.saved = self.pipe.unet
            unet = UNet2DConditionModel.from_pretrained(self.unet_dir, local_files_only=True)
            self.pipe.unet = unet.to(self.saved.device, self.saved.dtype)

    def __exit__(self, *exc):
        if self.saved is not None:
            self.pipe.unet = self.saved


def scheduler_from_name(name: str, config):
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose from {', '.join(SCHEDULERS)}")
    return getattr(diffusers, SCHEDULERS[name]).from_config(config)


# -- grids and PNG metadata ------------------------------------------------------------------------


def compose_grid(images: list[list[Image.Image]], captions: list[list[str]], row_labels: list[str] | None = None, scale: int = 1) -> Image.Image:
    """One picture: a caption block above each column, images upscaled by `scale` (nearest)."""
    font = ImageFont.load_default()
    cell_w = max(im.width for row in images for im in row) * scale
    cell_h = max(im.height for row in images for im in row) * scale
    cell_w = max(cell_w, 120)
    line_h = 12
    header = line_h * max(len(c) for c in captions) + 6
    left = 0 if not row_labels else 8 + line_h * 0 + max(len(s) for s in row_labels) * 6
    grid = Image.new("RGB", (left + cell_w * len(captions), header + cell_h * len(images)), "white")
    draw = ImageDraw.Draw(grid)
    for c, lines in enumerate(captions):
        for j, text in enumerate(lines):
            draw.text((left + c * cell_w + 4, 3 + j * line_h), text[: cell_w // 6], fill="black", font=font)
    for r, row in enumerate(images):
        if row_labels:
            draw.text((4, header + r * cell_h + cell_h // 2 - 6), row_labels[r], fill="black", font=font)
        for c, image in enumerate(row):
            image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
            grid.paste(image, (left + c * cell_w + (cell_w - image.width) // 2, header + r * cell_h))
    return grid


def save_png(image: Image.Image, path: Path, settings: dict) -> Path:
    """Write a PNG whose metadata holds everything needed to regenerate it."""
    info = PngInfo()
    info.add_text(PNG_KEY, json.dumps(settings, sort_keys=True, default=str))
    info.add_text("parameters", settings_line(settings))
    image.save(path, pnginfo=info)
    return path


def read_png_settings(path: Path) -> dict | None:
    with Image.open(path) as image:
        text = image.text.get(PNG_KEY) if hasattr(image, "text") else None
    return json.loads(text) if text else None


def settings_line(settings: dict) -> str:
    """The one-line summary image tools show (prompt first, then key: value pairs)."""
    rest = ", ".join(f"{k}: {v}" for k, v in settings.items() if k not in ("prompt", "negative_prompt"))
    negative = f"\nNegative prompt: {settings['negative_prompt']}" if settings.get("negative_prompt") else ""
    return f"{settings.get('prompt', '')}{negative}\n{rest}"
