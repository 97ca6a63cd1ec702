"""The calls that need the registry of methods: attach a method by its config, and load a tuner
file (whose header names its method). The layers below import nothing from here:
core (handles, routing) <- io (tuner files) <- methods (the registry) <- api.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

from safetensors import safe_open

from . import arch
from .core import DEFAULT_NAME, AttachError, Attached, attached, detach, keep_tuners_out_of_state
from .identifier import ENCODERS
from .io import TunerFileError, check_tensors, read_header
from .methods import config_from_dict, method_for_config
from .methods.lora import LoraConfig
from .methods.lora.model import check_updates


def _parts(model, text_encoder, text_encoder_2, tokenizer, tokenizer_2):
    """(U-Net, {attribute: text encoder}, {attribute: tokenizer}) of a U-Net or a pipeline (whose
    own text encoders and tokenizers are used where none are given)."""
    unet = getattr(model, "unet", model)
    given = {"text_encoder": text_encoder, "text_encoder_2": text_encoder_2, "tokenizer": tokenizer, "tokenizer_2": tokenizer_2}
    if unet is not model:
        given = {k: v if v is not None else getattr(model, k, None) for k, v in given.items()}
    encoders = {k: given[k] for k in ("text_encoder", "text_encoder_2") if given[k] is not None}
    return unet, encoders, {k: given[k] for k in ("tokenizer", "tokenizer_2")}


def attach(model, config, name: str = DEFAULT_NAME, *, replace: bool = False, text_encoder=None, text_encoder_2=None,
           tokenizer=None, tokenizer_2=None) -> Attached:
    """Freeze the backbone and attach the method `config` describes to `model`, a U-Net or a
    pipeline; return its handle.

    The text encoders (SDXL: two) and their tokenizers are for a method that tunes them too: a LoRA
    with `text_encoder` / `text_encoder_2` layers, a Res-Tuning config with an identifier. A
    pipeline brings its own; with a bare U-Net pass them. They are given to the method only then,
    so the other methods' attach stays (unet, config, name).

    Attaching under a name that is already taken is refused unless `replace=True`, which detaches
    the old one first: weights are never silently doubled. Tuners attached earlier under other
    names keep their trainable state: only the backbone's own parameters are frozen.
    """
    unet, encoders, tokenizers = _parts(model, text_encoder, text_encoder_2, tokenizer, tokenizer_2)
    method = method_for_config(config)
    config.validate()
    table = attached(unet)
    if name in table:
        if not replace:
            raise AttachError(
                f"a {table[name].config.method} tuner is already attached as {name!r}; "
                f"call restuning.detach(unet) first, pass replace=True, or use another name"
            )
        detach(unet, name)
    if any(a.config.method == "full" for a in table.values()) or (config.method == "full" and table):
        raise AttachError("full fine-tuning cannot be combined with other tuners on the same U-Net")
    earlier = {id(p): (p, p.requires_grad) for a in table.values() for p in a.parameters()}
    for p in unet.parameters():
        if id(p) not in earlier:
            p.requires_grad_(False)
    takes = inspect.signature(method.attach).parameters
    extra = {k: v for k, v in encoders.items() if k in takes}
    if "text_encoders" in takes:
        extra["text_encoders"] = {k: (v, tokenizers[dict(ENCODERS)[k]]) for k, v in encoders.items()}
    try:
        handle = method.attach(unet, config, name, **extra)
    finally:
        # peft marks only its own adapter trainable when it injects one, freezing everything else.
        for p, trainable in earlier.values():
            p.requires_grad_(trainable)
    table[name] = handle
    keep_tuners_out_of_state(unet)
    return handle


def read_config(path: str | os.PathLike):
    """The method config stored in a tuner file."""
    metadata = read_header(path)
    try:
        return config_from_dict(json.loads(metadata["config"]))
    except (ValueError, TypeError) as exc:
        raise TunerFileError(f"{Path(path).name}: the stored config is not usable: {exc}") from None


def load(model, path: str | os.PathLike, name: str = DEFAULT_NAME, *, replace: bool = False, text_encoder=None,
         text_encoder_2=None, tokenizer=None, tokenizer_2=None) -> Attached:
    """Attach the tuner stored in `path` to `model` (a pipeline, or its U-Net) and load its weights,
    in one call.

    `path` is a restuning tuner file, or a LoRA file in diffusers' or kohya's format (converted by
    restuning.methods.lora.convert). A tuner that tunes the text encoder too (a LoRA of its layers,
    a Res-Tuning tuner that learned its identifier's embedding) needs the text encoders (and for
    the identifier their tokenizers): a pipeline brings them, with a bare U-Net pass them.
    """
    from .methods.lora import convert

    unet, encoders, tokenizers = _parts(model, text_encoder, text_encoder_2, tokenizer, tokenizer_2)
    path = Path(path)
    if convert.is_foreign_lora(path):
        config, state = convert.read(path, unet, encoders.get("text_encoder"), encoders.get("text_encoder_2"))
    else:
        metadata = read_header(path)
        config = read_config(path)
        mismatch = arch.mismatch_message(json.loads(metadata["base_arch"]), unet)
        if mismatch:
            raise TunerFileError(f"{path.name}: {mismatch}")
        with safe_open(str(path), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
    check_tensors(state, path.name)
    if isinstance(config, LoraConfig):
        check_updates(config, state, state.__getitem__, path.name)
    handle = attach(unet, config, name, replace=replace, **encoders, **tokenizers)
    device = next(unet.parameters()).device
    try:
        handle.load_state_dict({k: v.to(device) for k, v in state.items()})
    except ValueError as exc:
        detach(unet, name)
        raise TunerFileError(f"{path.name}: {exc}") from None
    return handle
