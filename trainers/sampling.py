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
import os
import threading
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
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


class Turns:
    """A lock granted in the order it was asked for. threading.Lock is not fair: a renderer that
    releases it between rows and asks again at once usually gets it back, so another visitor's
    render would wait for the whole grid; here it gets the next turn."""

    def __init__(self):
        self._cond = threading.Condition()
        self._issued = 0
        self._serving = 0

    @property
    def waiting(self) -> int:
        """Turns asked for and not yet granted."""
        with self._cond:
            return self._issued - self._serving - 1 if self._issued > self._serving else 0

    @contextmanager
    def turn(self):
        with self._cond:
            ticket, self._issued = self._issued, self._issued + 1
            while ticket != self._serving:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._serving += 1
                self._cond.notify_all()


class Sampler:
    """Holds one base pipeline and the tuners loaded into its U-Net; renders grids.

    The device is shared fairly: a render takes one turn (Turns) per pipeline pass (one row of
    routable columns, or one chunk of rows of a column of its own), so renders of several
    visitors interleave pass by pass instead of one waiting for another's whole grid. Each pass
    sets the pipeline up for itself (its tuners loaded, every other tuner at strength 0, which is
    no computation at all: restuning.set_scale), so nothing a pass does not show acts on it."""

    def __init__(self, pipe, rows_per_call: int = 1):
        self.pipe = pipe
        # A column of its own (LoRA, full fine-tuning) renders up to this many rows per pipeline
        # call, each row with its own prompt and seeded generator (the same starting noise as a
        # call of its own); 1 keeps one call per row.
        self.rows_per_call = max(1, int(rows_per_call))
        self._names: OrderedDict[str, str] = OrderedDict()  # tuner file key -> attached name
        self.turns = Turns()

    # -- tuners -------------------------------------------------------------------------------

    def _attach(self, path: Path) -> str:
        stat = path.stat()
        key = f"{path.resolve()}:{stat.st_mtime_ns}:{stat.st_size}"
        if key in self._names:
            self._names.move_to_end(key)
            return self._names[key]
        name = "t" + hashlib.sha1(key.encode()).hexdigest()[:12]
        # the pipeline: its text encoders for a tuner that tunes them too (a LoRA's layers, an
        # identifier's embedding); set_scale then switches all on and off
        restuning.load(self.pipe, path, name=name)
        self._names[key] = name
        while len(self._names) > MAX_LOADED_TUNERS:
            _, old = self._names.popitem(last=False)
            restuning.detach(self.pipe.unet, old)
        return name

    @contextmanager
    def _pass(self, columns: list[Column], active, held: bool = False):
        """One pipeline pass's turn (`held`: the caller holds it already): the columns' tuners
        loaded (a pass of another render may have unloaded them), the `active` ones at their
        scale, every other loaded tuner at 0. Yields the attached names by column (None: base)."""
        with nullcontext() if held else self.turns.turn():
            names = [self._attach(c.tuner) if c.tuner is not None else None for c in columns]
            shown = {names[i]: columns[i].scale for i in active if names[i] is not None}
            for name in set(self._names.values()):
                restuning.set_scale(self.pipe.unet, shown.get(name, 0.0), name=name)
            try:
                yield names
            finally:
                for name in shown:
                    restuning.set_scale(self.pipe.unet, 0.0, name=name)

    # -- rendering ----------------------------------------------------------------------------

    def render(self, columns: list[Column], rows: list[Settings], progress: Callable[[float, str], None] | None = None) -> list[list[Image.Image]]:
        """Images as rows x columns; each row is one Settings (a prompt and seed), each column a
        tuner. Its passes: one per row for all routable columns in one batch, then each column
        of its own by chunks of rows (a full fine-tune's in one pass: its U-Net is read from
        disk once per render). Each pass takes a turn; the first one plans the rest too."""
        grid: list[list[Image.Image | None]] = [[None] * len(columns) for _ in rows]
        done, routable = [0], []

        def tick(label):
            def on_step(pipe, step, timestep, kwargs):
                if progress is not None:
                    progress((done[0] + (step + 1) / pipe.num_timesteps) / max(total, 1), label)
                return kwargs
            return on_step

        def run(active, chunks, held=False):
            with self._pass(columns, active, held) as names, self._unet_of(columns[active[0]]), \
                    restuning.route([names[i] for i in active]):
                for chunk in chunks:
                    if active is routable:  # one row, every routable column in one batch
                        images = self._call(rows[chunk[0]], len(active), tick(f"row {chunk[0] + 1}: {len(active)} columns in one batch"))
                        for i, image in zip(active, images):
                            grid[chunk[0]][i] = image
                    else:
                        images = self._call_rows([rows[r] for r in chunk], tick(f"rows {chunk[0] + 1}-{chunk[-1] + 1}: {columns[active[0]].label}"))
                        for r, image in zip(chunk, images):
                            grid[r][active[0]] = image
                    done[0] += len(chunk)

        try:
            with self.turns.turn():
                names = [self._attach(c.tuner) if c.tuner is not None else None for c in columns]
                table = restuning.attached(self.pipe.unet)
                routable += [i for i, (c, n) in enumerate(zip(columns, names)) if c.unet_dir is None and (n is None or table[n].routable)]
                work = [(routable, [[r]]) for r in range(len(rows))] if routable else []
                for i in (i for i in range(len(columns)) if i not in routable):
                    chunks = self._chunks(rows)
                    work += [([i], chunks)] if columns[i].unet_dir is not None else [([i], [c]) for c in chunks]
                total = sum(len(c) for _, chunks in work for c in chunks)
                run(*work[0], held=True)
            for active, chunks in work[1:]:
                run(active, chunks)
        except torch.OutOfMemoryError:
            raise SamplingError(out_of_memory_message(self.pipe.device, len(routable))) from None
        return grid

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


def _fit(draw, text: str, font, width: int) -> str:
    """`text` cut to `width` pixels, with an ellipsis where it was cut."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _wrap(draw, text: str, font, width: int, most: int = 3) -> list[str]:
    """`text` in lines of at most `width` pixels, broken between words; at most `most` lines."""
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    lines.append(line)
    return [_fit(draw, ln, font, width) for ln in lines[:most]]


def compose_grid(images: list[list[Image.Image]], captions: list[list[str]], row_labels: list[str] | None = None, scale: int = 1) -> Image.Image:
    """One picture: a caption block above each column, images upscaled by `scale` (nearest).
    Text is sized to the cells (about a fourteenth of a cell's width), so it stays legible at the
    size the picture is shown; a caption line too long for its column ends in an ellipsis, a row
    label wraps onto up to three lines in a margin sized to it."""
    cell_w = max(max(im.width for row in images for im in row) * scale, 120)
    cell_h = max(im.height for row in images for im in row) * scale
    font = ImageFont.load_default(size=max(11, cell_w // 14))
    line_h = int(font.size * 1.25)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    header = line_h * max(len(c) for c in captions) + line_h // 2
    labels = [_wrap(measure, text, font, cell_w) for text in row_labels or []]
    left = (max(measure.textlength(ln, font=font) for lines in labels for ln in lines) + font.size) if labels else 0
    left = int(left)
    grid = Image.new("RGB", (left + cell_w * len(captions), header + cell_h * len(images)), "white")
    draw = ImageDraw.Draw(grid)
    for c, lines in enumerate(captions):
        for j, text in enumerate(lines):
            draw.text((left + c * cell_w + 4, 3 + j * line_h), _fit(draw, text, font, cell_w - 8), fill="black", font=font)
    for r, row in enumerate(images):
        for j, text in enumerate(labels[r] if labels else []):
            top = header + r * cell_h + cell_h // 2 - len(labels[r]) * line_h // 2
            draw.text((font.size // 2, top + j * line_h), text, fill="black", font=font)
        for c, image in enumerate(row):
            image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
            grid.paste(image, (left + c * cell_w + (cell_w - image.width) // 2, header + r * cell_h))
    return grid


def save_png(image: Image.Image, path: Path, settings: dict) -> Path:
    """Write a PNG whose metadata holds everything needed to regenerate it (under a temporary
    name, then renamed: a full disk leaves no half picture)."""
    info = PngInfo()
    info.add_text(PNG_KEY, json.dumps(settings, sort_keys=True, default=str))
    info.add_text("parameters", settings_line(settings))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_png_settings(path: Path) -> dict | None:
    """The settings a PNG made here holds; None for a PNG without them. ValueError (or OSError)
    for a file that is no readable PNG or whose settings are not a bounded JSON object."""
    from .safe_json import Unreadable, loads

    with Image.open(path) as image:
        text = image.text.get(PNG_KEY) if hasattr(image, "text") else None
    if not text:
        return None
    try:
        value = loads(text, max_bytes=64 * 1024)
    except Unreadable as exc:
        raise ValueError(f"its settings are unreadable ({exc})") from None
    return value if isinstance(value, dict) else None


def settings_line(settings: dict) -> str:
    """The one-line summary image tools show (prompt first, then key: value pairs)."""
    rest = ", ".join(f"{k}: {v}" for k, v in settings.items() if k not in ("prompt", "negative_prompt"))
    negative = f"\nNegative prompt: {settings['negative_prompt']}" if settings.get("negative_prompt") else ""
    return f"{settings.get('prompt', '')}{negative}\n{rest}"
