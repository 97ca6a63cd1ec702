"""One file format for every tuner: safetensors weights with the method's config, the format
version and the base architecture's fingerprint in the header, so a single downloaded file is
self-describing. Loading never unpickles anything.

Writing and checking files lives here; `restuning.load` and `restuning.read_config`, which need
the registry of methods to rebuild a config, live in restuning/api.py, so that the methods (whose
exports write tuner files) can import this module without an import cycle.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import arch
from .core import DEFAULT_NAME, attached

FORMAT = "restuning"
# 2: the Bypass's second design (zero-conv output, Convpass, text tuners) and Res-Prefix / Res-Prompt
# at an adapter's pace (a gated Res-Prefix, Res-Prompt's W_o reading a scaled attention output).
# 3: Res-Prefix ends in a zero-initialised output projection W_o instead of the per-channel gate.
# 4: Res-Tuning files may hold convolutional Res-Adapters beside ResNet blocks (OP "resnet") and the
# identifier's learned input-embedding rows (`text_encoder.identifier.delta`); a version 3 reader
# would refuse their config's new fields, so they say version 4.
# The other methods' files are the same as in version 1.
FORMAT_VERSION = 4
_PACE = ("version 1 holds Res-Prefix / Res-Prompt tuners of the earlier form (no prefix gate, an unscaled prompt "
         "output), whose weights would render differently now; train them again")
_PREFIX_OUT = ("versions 1 and 2 hold Res-Prefix tuners of an earlier form (a per-channel gate where it now has an "
               "output projection W_o), whose weights do not carry over; train them again")


def oldest_readable(method: str, config: dict) -> tuple[int, str]:
    """The oldest format version a file of this method and config can be read from, and why."""
    if method == "bypass" and isinstance(config, dict) and "prefix" in {str(config.get("horizontal")), str(config.get("vertical"))}:
        return 3, _PREFIX_OUT
    if method == "bypass":
        return 2, ("version 1 holds the first Bypass design (a gated output g ⊙ (x_L^b − x_L)), which learned nothing "
                   "and whose weights do not carry over; train the Bypass again")
    tuners = config.get("tuners") if isinstance(config, dict) else None
    kinds = set(map(str, tuners.values())) if method == "res-tuning" and isinstance(tuners, dict) else set()
    if "prefix" in kinds:
        return 3, _PREFIX_OUT
    if "prompt" in kinds:
        return 2, _PACE
    return 1, ""


class TunerFileError(ValueError):
    """A tuner file that cannot be loaded; the message says why."""


# What a tuner's weights may be stored as: the floating-point types training writes. An integer or
# boolean tensor would be cast silently on load into weights nobody trained.
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# The largest weight a tuner may hold: fp16's largest number. A GPU without bf16 renders in fp16
# (trainers.sampling.inference_dtype), where a larger weight becomes inf, so the tuner cannot
# render there at all; on any device one near it sends activations to inf (3e38 turns a CPU's
# fp32 picture black too). Nothing trained comes near: SD's own weights ship in fp16.
MAX_WEIGHT = torch.finfo(torch.float16).max  # 65,504


def check_tensors(state: dict[str, torch.Tensor], name: str) -> None:
    """TunerFileError unless every tensor is of a WEIGHT_DTYPES type, finite and at most
    MAX_WEIGHT in magnitude: one NaN or inf weight turns every image it touches black, and 0 x NaN
    is NaN, so a tuner at strength 0 too."""
    for key, tensor in state.items():
        if tensor.dtype not in WEIGHT_DTYPES:
            raise TunerFileError(f"{name}: {key} holds {str(tensor.dtype).removeprefix('torch.')} values; "
                                 "a tuner's weights are floating-point numbers (float32, float16 or bfloat16)")
        if not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise TunerFileError(f"{name}: {key} holds {bad} value(s) that are not finite (NaN or infinity); "
                                 "such a tuner would turn every image black")
        # compared in at least fp32: bf16 would round the bound itself up to 65,536
        huge = int((tensor.abs().to(torch.promote_types(tensor.dtype, torch.float32)) > MAX_WEIGHT).sum())
        if huge:
            raise TunerFileError(f"{name}: {key} holds {huge} value(s) beyond ±{MAX_WEIGHT:,.0f}, the largest number half "
                                 "precision holds (what a GPU renders in); such a tuner would turn images black")


def save(model, path: str | os.PathLike, name: str = DEFAULT_NAME, extra: dict[str, str] | None = None) -> Path:
    """Write the tuner attached as `name` to `model` (a U-Net or its pipeline) to `path` (written to
    a temporary name, then renamed)."""
    unet = getattr(model, "unet", model)
    table = attached(unet)
    if name not in table:
        raise TunerFileError(f"nothing to save: no tuner named {name!r} is attached")
    handle = table[name]
    return write(path, handle.state_dict(), handle.config, unet, extra)


def write(path: str | os.PathLike, state: dict[str, torch.Tensor], config, unet, extra: dict[str, str] | None = None) -> Path:
    """Write `state` as a tuner file of `config` for `unet`'s architecture (save() for an attached
    tuner; a LoRA file from elsewhere converted to this format uses it directly)."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    check_tensors(state, Path(path).name)  # a tuner that diverged is not written as if it had trained
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "method": config.method,
        "config": config.to_json(),
        "base_arch": json.dumps(arch.fingerprint(unet), sort_keys=True),
        **(extra or {}),
    }
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(state, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    except BaseException:  # a full disk: no half-written file is left beside the old one
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_header(path: str | os.PathLike) -> dict[str, str]:
    """The header metadata of a tuner file, checked; raises TunerFileError naming the problem."""
    path = Path(path)
    if not path.is_file():
        raise TunerFileError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise TunerFileError(f"{path.name}: not a safetensors file ({exc})") from None
    if metadata.get("format") != FORMAT:
        raise TunerFileError(
            f"{path.name}: not a restuning tuner file (its header has no 'format: {FORMAT}'), "
            "nor a LoRA file in diffusers' or kohya's format (no unet.…lora / lora_unet_… keys)"
        )
    try:
        version = int(metadata.get("format_version", ""))
    except ValueError:
        raise TunerFileError(f"{path.name}: the header's format_version is missing or not a number") from None
    if version > FORMAT_VERSION:
        raise TunerFileError(f"{path.name}: format version {version} is newer than this restuning reads ({FORMAT_VERSION}); upgrade restuning")
    if version < 1:
        raise TunerFileError(f"{path.name}: unknown format version {version}")
    parsed = {}
    for key in ("config", "base_arch"):
        try:
            parsed[key] = json.loads(metadata.get(key, ""))
        except (json.JSONDecodeError, RecursionError):
            raise TunerFileError(f"{path.name}: the header's {key} is missing or not valid JSON") from None
    oldest, why = oldest_readable(metadata.get("method", ""), parsed["config"])
    if version < oldest:
        raise TunerFileError(f"{path.name}: a {metadata.get('method')} file of format version {version}, older than this restuning "
                             f"reads ({oldest}): {why}")
    return metadata


def file_size(path) -> int:
    return Path(path).stat().st_size


def tensor_count(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in state.values())
