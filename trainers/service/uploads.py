"""What the studio accepts from a browser, checked before anything is copied into a run folder.

Image content (format sniffed from the bytes, corrupt or truncated files, decompression bombs,
minimum size) is judged by `trainers.images.check_image`, the same check the trainer applies;
this module adds only what is specific to uploads: how many files, how many bytes, and names
that could escape a folder. Every problem of a batch is reported at once, one line per file.
"""

from __future__ import annotations

import copy
import json
import os
import re
import unicodedata
from pathlib import Path

from ..images import ImageError, check_image

MAX_FILES = 50
MAX_FILE_BYTES = 20 * 1024 * 1024
MAX_TUNER_BYTES = 4 * 1024 * 1024 * 1024  # a full fine-tune of SD v1.5 in fp32 is 3.4 GB
SHARED_MAX_UPLOAD_BYTES = 512 * 1024 * 1024  # a shared studio: any tuner but a full fine-tune
MAX_NAME_CHARS = 120
EXTENSIONS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp"}


class UploadError(ValueError):
    """Uploads that cannot be used; str() is a message for a person, one line per problem.
    `refused`: the files refused for what they are (name, size, content), as opposed to ones
    refused only with their batch (too many files); see `discard`."""

    def __init__(self, message: str, refused=()):
        super().__init__(message)
        self.refused = list(refused)


def check_name(name: str, what: str = "name") -> str:
    """A user-given name that is safe as one path component, or UploadError saying why not."""
    name = (name or "").strip()
    if not name:
        raise UploadError(f"the {what} is empty")
    if "/" in name or "\\" in name or os.sep in name:
        raise UploadError(f"the {what} {name!r} contains a path separator ('/' or '\\'); use a plain name")
    if name in (".", "..") or name.startswith("."):
        raise UploadError(f"the {what} {name!r} may not start with a dot")
    if any(unicodedata.category(ch) == "Cc" for ch in name):
        raise UploadError(f"the {what} {name!r} contains control characters")
    if len(name) > MAX_NAME_CHARS:
        raise UploadError(f"the {what} is {len(name)} characters long; the limit is {MAX_NAME_CHARS}")
    return name


def _size(n: int) -> str:
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("kB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def original_name(path: str | os.PathLike) -> str:
    """The name the browser sent. Gradio keeps it as the last component of the temp path; a
    Windows client's backslashes survive in it as ordinary characters, so check_name sees them."""
    return Path(path).name


def check_images(paths: list[str | os.PathLike] | None, *, max_files: int = MAX_FILES,
                 max_bytes: int = MAX_FILE_BYTES) -> list[tuple[Path, str]]:
    """Checked uploads as [(path, safe file name for the run's instance folder)].

    Safe names are numbered and carry the extension of the format found in the content, so two
    uploads called `dog.png` stay distinct and a PNG named `.jpg` is stored as what it is.
    """
    paths = [Path(p) for p in (paths or [])]
    if not paths:
        raise UploadError("no images: upload a few (3-10) photos of the concept, PNG, JPEG or WebP")
    if len(paths) > max_files:
        raise UploadError(f"{len(paths)} files: at most {max_files} images per run; a handful is enough for DreamBooth")
    problems, checked, refused = [], [], []
    for index, path in enumerate(paths):
        label = original_name(path)
        try:
            check_name(label, "file name")
            size = path.stat().st_size
            if size > max_bytes:
                raise UploadError(f"{label}: {_size(size)} is over the {_size(max_bytes)} limit per image")
            info = check_image(path)
        except (UploadError, ImageError) as exc:
            problems.append(str(exc))
            refused.append(path)
            continue
        except OSError as exc:
            problems.append(f"{label}: cannot be read ({exc.strerror or exc})")
            continue
        stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(label).stem).strip("_")[:40] or "image"
        checked.append((path, f"{index:02d}-{stem}{EXTENSIONS[info.format]}"))
    if problems:
        raise UploadError(f"{len(problems)} of {len(paths)} files cannot be used:\n" + "\n".join(problems), refused)
    return checked


def discard(paths, upload_dir: str | os.PathLike) -> None:
    """Delete refused uploads, but only files inside `upload_dir` (where the web server stores
    what browsers send): a path that names anything else (an example image) is left alone.

    Gradio stores an upload under a folder named by a hash of its bytes, so two visitors who
    send the same file get the same path. Pass only files refused for what they are (their
    name, size or content: UploadError.refused), which are refused to anyone holding that path;
    a good file refused with its batch stays, for whoever else uploaded it, until it expires."""
    root = Path(upload_dir).resolve()
    for path in paths or []:
        path = Path(path)
        if path.resolve().is_relative_to(root) and path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)


def _check_file(path: Path, max_bytes: int) -> str:
    """The upload's name, once its name, size and first bytes are fine for a safetensors file."""
    label = original_name(path)
    check_name(label, "file name")
    if path.stat().st_size > max_bytes:
        raise UploadError(f"{label}: {_size(path.stat().st_size)} is over the {_size(max_bytes)} limit")
    with open(path, "rb") as f:
        head = f.read(9)
    # a safetensors file opens with its header's length (8 bytes, little-endian) and then "{": its
    # first bytes can read b"PK" or 0x80 too (a header of 19,280 or 128 + 256k bytes)
    safetensors = len(head) == 9 and head[8:] == b"{" and int.from_bytes(head[:8], "little") <= path.stat().st_size - 8
    if not safetensors and (head[:2] == b"PK" or head[:1] == b"\x80"):
        raise UploadError(f"{label}: this is a pickle/PyTorch checkpoint; only .safetensors tuner files are accepted "
                          "(pickles can run code when loaded)")
    return label


def lora_as_tuner_file(path: str | os.PathLike, base_unet, base_text_encoder, base_text_encoder_2=None, *,
                       max_bytes: int = MAX_TUNER_BYTES, workdir: str | os.PathLike | None = None) -> Path:
    """An uploaded LoRA file in diffusers' or kohya's format, converted to a restuning tuner file
    (in `workdir` under the upload's own name, so that a refusal or the run's "imported from"
    names the user's file; else `<name>-restuning.safetensors` beside it: an upload folder is
    shared by every visitor who sent the same bytes, so the studio passes a folder of its own)
    after the same file checks as check_tuner_file and a check of every layer it changes against
    the base model (weightless models will do); any other file is returned as it is, for
    check_tuner_file to judge."""
    from restuning import TunerFileError
    from restuning.methods.lora import convert

    path = Path(path)
    label = _check_file(path, max_bytes)
    if not convert.is_foreign_lora(path):
        return path
    target = Path(workdir) / path.name if workdir is not None else path.parent / f"{path.stem}-restuning.safetensors"
    if target.resolve() == path.resolve():  # never written over the upload
        target = path.parent / f"{path.stem}-restuning.safetensors"
    try:
        return convert.write_tuner(path, target, base_unet, base_text_encoder, base_text_encoder_2)
    except TunerFileError as exc:  # its weights are checked as the converted file is written
        raise UploadError(str(exc).replace(str(path), label).replace(target.name, label)) from None


def check_tuner_file(path: str | os.PathLike, base_unet, *, base_text_encoder=None, base_text_encoder_2=None,
                     tokenizers: dict | None = None, max_bytes: int = MAX_TUNER_BYTES):
    """An uploaded tuner: a restuning safetensors file (never a pickle) whose stored config is
    valid, whose architecture fingerprint matches `base_unet` (anything with a diffusers U-Net
    `.config`) and whose tensors are exactly the ones that config attaches, with their shapes: a
    header cannot announce a size its weights do not have (a copy of the U-Net on the meta device
    takes the tuner, so the check costs no memory; a copy of `base_text_encoder`, also weightless,
    for a LoRA that tunes the text encoder too, and of SDXL's `base_text_encoder_2`; `tokenizers`,
    {"tokenizer": ..., "tokenizer_2": ...}, find a Res-Tuning tuner's identifier). Returns
    (method config, header metadata)."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open

    from restuning import AttachError, ConfigError, TunerFileError, attach, read_config, read_header
    from restuning.arch import FINGERPRINT_FIELDS, mismatch_message
    from restuning.io import check_tensors
    from restuning.methods.lora import LoraConfig
    from restuning.methods.lora.model import check_updates

    path = Path(path)
    label = _check_file(path, max_bytes)
    try:
        header = read_header(path)
        if not isinstance(json.loads(header["config"]), dict):
            raise UploadError(f"{label}: the header's config is not a JSON object of method options")
        config = read_config(path)
    except TunerFileError as exc:
        raise UploadError(str(exc).replace(str(path), label)) from None
    arch = json.loads(header["base_arch"])
    missing = [f for f in FINGERPRINT_FIELDS if f not in arch] if isinstance(arch, dict) else list(FINGERPRINT_FIELDS)
    if missing:
        raise UploadError(f"{label}: the header's base_arch does not describe a U-Net (no {', '.join(missing)})")
    mismatch = mismatch_message(arch, base_unet)
    if mismatch:
        raise UploadError(f"{label}: {mismatch.replace('this base model', 'this studio’s base model')}")
    try:
        with torch.device("meta"):
            probe = UNet2DConditionModel.from_config(base_unet.config)
            text_probes = {name: copy.deepcopy(model) if model is not None else None
                           for name, model in (("text_encoder", base_text_encoder), ("text_encoder_2", base_text_encoder_2))}
            expected = {k: tuple(v.shape) for k, v in attach(probe, config, **text_probes, **(tokenizers or {})).state_dict().items()}
    except (ConfigError, ValueError, TypeError, AttachError) as exc:
        raise UploadError(f"{label}: its config cannot be attached to this base model: {exc}") from None
    with safe_open(str(path), framework="pt") as f:
        found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        if found == expected:
            for key in f.keys():  # one tensor in memory at a time
                try:
                    check_tensors({key: f.get_tensor(key)}, label)
                except TunerFileError as exc:
                    raise UploadError(str(exc)) from None
            if isinstance(config, LoraConfig):
                try:
                    check_updates(config, f.keys(), f.get_tensor, label)
                except TunerFileError as exc:
                    raise UploadError(str(exc)) from None
    if found != expected:
        wrong = sorted(k for k in expected.keys() & found.keys() if expected[k] != found[k])
        problems = [f"{len(expected.keys() - found.keys())} tensor(s) its config needs are missing",
                    f"{len(found.keys() - expected.keys())} are not the config's",
                    *(f"{k} is {list(found[k])}, its config makes {list(expected[k])}" for k in wrong[:3])]
        raise UploadError(f"{label}: its tensors do not match its config: " + "; ".join(problems))
    return config, header
