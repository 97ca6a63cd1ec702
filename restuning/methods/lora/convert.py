"""LoRA files from elsewhere, as restuning LoRA tuners: diffusers' `pytorch_lora_weights.safetensors`
(keys `unet.<path>.lora.down/up.weight`, `unet.<path>.lora_A/B.weight`, peft's config in the header)
and kohya / AUTOMATIC1111 / ComfyUI files (keys `lora_unet_<path>.lora_down/lora_up.weight`,
`.alpha`, `lora_te_…` for the text encoder).

The conversion is diffusers' own, step for step what `pipe.load_lora_weights` does, so an imported
file renders as diffusers renders it: `lora_state_dict` (kohya -> diffusers keys and alphas),
`convert_unet_state_dict_to_peft` / `convert_state_dict_to_peft` (-> peft keys) and
`get_peft_kwargs` (rank, alpha and target layers from the weights) or the peft config diffusers
wrote into the header. What is left here: mapping peft's config onto `LoraConfig`, and checking
the file against the base model before anything is attached. Only safetensors files are read.
"""

from __future__ import annotations

import math
from pathlib import Path

from safetensors import SafetensorError, safe_open

from ...arch import family
from ...core import BLOCK_GROUPS
from ...io import FORMAT, TunerFileError, check_tensors, write
from .config import TEXT_ENCODER_ATTENTION, LoraConfig
from .model import TARGET_SUFFIXES, TEXT_ENCODER_2_PREFIX, TEXT_ENCODER_PREFIX, check_updates, split_names

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
DIFFUSERS_PREFIXES = ("unet.", "text_encoder.", "text_encoder_2.")
LORA_KEY_PARTS = (".lora.down.", ".lora.up.", ".lora_A.", ".lora_B.", ".lora_linear_layer.", "_lora.down.", "_lora.up.")
# LyCORIS and DoRA files look like kohya's but hold other decompositions, which a LoRA cannot carry.
NOT_LORA_PARTS = {"hada_": "LoHa", "lokr_": "LoKr", "dora_scale": "DoRA", "lora_magnitude_vector": "DoRA",
                  ".diff": "full-weight differences"}


def _keys_and_header(path: Path) -> tuple[list[str], dict[str, str]] | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys()), f.metadata() or {}
    except (SafetensorError, OSError, ValueError):
        return None


def file_format(keys: list[str]) -> str | None:
    """'kohya', 'diffusers', 'mixed' (LoRA keys of both), or None for keys of neither layout."""
    if keys and all(k.startswith(KOHYA_PREFIXES) for k in keys):
        return "kohya"
    lora = any(p in k for k in keys for p in LORA_KEY_PARTS)
    if keys and all(k.startswith(DIFFUSERS_PREFIXES) for k in keys) and lora:
        return "diffusers"
    if keys and all(k.startswith(KOHYA_PREFIXES + DIFFUSERS_PREFIXES) for k in keys) and lora:
        return "mixed"
    return None


# A diffusers-format key is peft's (lora_A / lora_B) or diffusers' older one (lora.down / lora.up,
# lora_linear_layer); diffusers' loader tells them apart by one key and converts the whole part alike.
PEFT_KEY_PARTS = (".lora_A.", ".lora_B.")


def _layout(key: str) -> str | None:
    if key.startswith(KOHYA_PREFIXES):
        return "kohya"
    if any(p in key for p in PEFT_KEY_PARTS):
        return "peft"
    return "diffusers' older" if any(p in key for p in LORA_KEY_PARTS) else None


def mixed_layouts(keys: list[str]) -> tuple[tuple[str, str], tuple[str, str]] | None:
    """Two (layout, example key) of different layouts where a file mixes them (kohya's beside
    diffusers', or peft's beside diffusers' older within the U-Net's or the text encoder's keys);
    None when it holds one. diffusers reads such a file by one key's layout and skips or misreads
    the rest."""
    parts: dict[tuple[str, str], str] = {}
    for key in sorted(keys):
        layout = _layout(key)
        if layout is not None:
            part = "unet" if key.startswith(("unet.", "lora_unet_")) else "text encoder"
            parts.setdefault((part, layout), key)
    found = {layout: key for (_, layout), key in parts.items()}
    if "kohya" in found and len(found) > 1:
        other = next(layout for layout in found if layout != "kohya")
        return ("kohya", found["kohya"]), (other, found[other])
    for part in ("unet", "text encoder"):
        if (part, "peft") in parts and (part, "diffusers' older") in parts:
            return ("peft", parts[(part, "peft")]), ("diffusers' older", parts[(part, "diffusers' older")])
    return None


def is_foreign_lora(path) -> bool:
    """A safetensors file that is no restuning tuner file and whose keys are a LoRA's."""
    found = _keys_and_header(Path(path))
    return found is not None and found[1].get("format") != FORMAT and file_format(found[0]) is not None


def read(path, unet, text_encoder=None, text_encoder_2=None) -> tuple[LoraConfig, dict]:
    """The LoraConfig and tuner state (restuning.load's form) of a diffusers or kohya LoRA file,
    checked against `unet` (and the text encoders, for a file that tunes them); TunerFileError says
    what does not fit, for any content (a crafted header or odd tensors make diffusers' own
    conversion fail in its own ways: those are TunerFileErrors too). Nothing is attached. An SDXL
    U-Net reads SDXL files as diffusers' StableDiffusionXLPipeline.load_lora_weights does (kohya's
    SGM block names mapped by the U-Net's config)."""
    path = Path(path)
    try:
        return _read(path, unet, text_encoder, text_encoder_2)
    except TunerFileError:
        raise
    except (KeyError, TypeError, ValueError, ArithmeticError, IndexError, AttributeError, RuntimeError, RecursionError) as exc:
        raise TunerFileError(f"{path.name}: not a LoRA file diffusers' loader can read "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else 'no detail'})") from None


def _read(path: Path, unet, text_encoder=None, text_encoder_2=None) -> tuple[LoraConfig, dict]:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    keys, _ = _keys_and_header(path)
    kind = file_format(keys)
    for part, what in NOT_LORA_PARTS.items():
        if any(part in k for k in keys):
            raise TunerFileError(f"{path.name}: a {what} file, not a LoRA; only LoRA files can be imported")
    mixed = mixed_layouts(keys)
    if mixed:
        (a, key_a), (b, key_b) = mixed
        raise TunerFileError(f"{path.name} mixes LoRA key layouts, {a} ({key_a}) and {b} ({key_b}): a LoRA file holds one; "
                             "save it again in one layout with the tool that made it")
    xl = family(unet.config) == "sdxl"
    second = [k for k in keys if k.startswith(("lora_te2_", "text_encoder_2."))]
    if second and not xl:
        raise TunerFileError(f"{path.name} has weights for a second text encoder ({second[0]}, ...), as SDXL LoRAs do; "
                             "this base model has one: the LoRA was made for another model")
    try:
        # use_safetensors=True: diffusers would otherwise fall back to unpickling a file it cannot read
        reader = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
        state, alphas, metadata = reader.lora_state_dict(str(path), use_safetensors=True, local_files_only=True,
                                                         return_lora_metadata=True, **({"unet_config": unet.config} if xl else {}))
    except (ValueError, KeyError, SafetensorError) as exc:
        raise TunerFileError(f"{path.name}: diffusers cannot read this {kind} LoRA file ({exc})") from None

    unet_state, unet_kwargs = _unet_part(state, alphas, metadata)
    if not unet_state:
        raise TunerFileError(f"{path.name} has no U-Net weights: a LoRA of the text encoder alone cannot be imported")
    targets = _layers(unet_state)
    _check_fit(path, unet, unet_state, targets, "U-Net")  # first: a file for another model is told so, whatever else is odd
    rank, alpha = _rank_and_alpha(path, unet_kwargs, "U-Net")
    blocks = tuple(g for g, prefix in BLOCK_GROUPS.items() if any(t.startswith(prefix) for t in targets))
    outside = [t for t in targets if not t.startswith(tuple(BLOCK_GROUPS.values()))]
    if outside:
        raise TunerFileError(f"{path.name} changes U-Net layers outside its down, mid and up blocks ({', '.join(outside[:3])}), "
                             "which a restuning LoRA does not cover")
    texts, text_state = {}, {}
    for prefix, model in ((TEXT_ENCODER_PREFIX, text_encoder), (TEXT_ENCODER_2_PREFIX, text_encoder_2)):
        part, kwargs = _text_encoder_part(state, alphas, metadata, model, prefix)
        if not part:
            continue
        name = prefix[:-1]
        if model is None:
            example = next((k for k in keys if k.startswith((prefix, "lora_te2_" if prefix == TEXT_ENCODER_2_PREFIX else "lora_te"))), prefix)
            raise TunerFileError(f"{path.name} tunes the {name.replace('_', ' ')} too ({len(part)} weights, e.g. {example}): "
                                 f"load it with {name}=pipe.{name}")
        layers = _layers(part)
        _check_fit(path, model, part, layers, name.replace("_", " "))
        if _rank_and_alpha(path, kwargs, name.replace("_", " ")) != (rank, alpha):
            raise TunerFileError(f"{path.name}: its {name.replace('_', ' ')} LoRA has another rank or alpha than its U-Net LoRA; "
                                 "a restuning LoRA has one of each")
        texts[name] = _compact(model, layers, split_names(TEXT_ENCODER_ATTENTION), TEXT_ENCODER_ATTENTION)
        text_state.update({prefix + k: v for k, v in part.items()})

    config = LoraConfig(rank=rank, alpha=alpha, blocks=blocks,
                        targets=_compact(unet, targets, TARGET_SUFFIXES, "", tuple(BLOCK_GROUPS[g] for g in blocks)), **texts)
    config.validate()
    return config, {**unet_state, **text_state}


def write_tuner(path, dst, unet, text_encoder=None, text_encoder_2=None) -> Path:
    """The LoRA file `path` converted to a restuning tuner file `dst` for `unet` (checked as read()
    checks it; weightless meta-device models will do), so the studio lists, samples and hands it
    out like a LoRA trained here."""
    config, state = read(path, unet, text_encoder, text_encoder_2)
    check_tensors(state, Path(path).name)  # NaN said as such before the updates they make are judged
    check_updates(config, state, state.__getitem__, Path(path).name)
    return write(dst, state, config, unet, {"imported_from": file_format(_keys_and_header(Path(path))[0])})


def _layers(state: dict) -> list[str]:
    # from the weights, as get_peft_kwargs does: a header's target_modules may be name endings
    return sorted({k.split(".lora_")[0] for k in state})


def _part(state: dict, alphas: dict | None, metadata: dict | None, prefix: str):
    state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    alphas = {k.removeprefix(prefix): v for k, v in (alphas or {}).items() if k.startswith(prefix)} or None
    metadata = {k.removeprefix(prefix): v for k, v in metadata.items() if k.startswith(prefix)} if metadata else None
    return state, alphas, metadata


def _peft_kwargs(state: dict, alphas, metadata, is_unet: bool) -> dict:
    from diffusers.utils.peft_utils import get_peft_kwargs

    if metadata:  # the peft config diffusers' save_lora_weights stored: used as is, as its loader does
        return metadata
    ranks = {k: v.shape[1] for k, v in state.items() if "lora_B" in k and v.ndim > 1}
    return get_peft_kwargs(ranks, alphas, state, is_unet=is_unet)


def _unet_part(state, alphas, metadata):
    """diffusers' UNet2DConditionModel.load_lora_adapter, up to the point where it injects layers."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    state, alphas, metadata = _part(state, alphas, metadata, "unet.")
    if not state:
        return {}, {}
    if "lora_A" not in next(iter(state)):
        state = convert_unet_state_dict_to_peft(state)
    return state, _peft_kwargs(state, alphas, metadata, is_unet=True)


def _text_encoder_part(state, alphas, metadata, text_encoder, prefix: str = TEXT_ENCODER_PREFIX):
    """diffusers' _load_lora_into_text_encoder, up to the point where it injects layers."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft

    state, alphas, metadata = _part(state, alphas, metadata, prefix)
    if not state:
        return {}, {}
    state = convert_state_dict_to_peft(convert_state_dict_to_diffusers(state))
    # transformers 5's CLIPTextModel has no `text_model.` level; files written with older ones do
    if text_encoder is not None and not hasattr(text_encoder, "text_model"):
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    return state, _peft_kwargs(state, alphas, metadata, is_unet=False)


def _rank_and_alpha(path: Path, kwargs: dict, part: str) -> tuple[int, int]:
    if kwargs.get("use_dora") or kwargs.get("lora_bias"):
        raise TunerFileError(f"{path.name}: its {part} LoRA uses {'DoRA' if kwargs.get('use_dora') else 'bias terms'}, "
                             "which a restuning LoRA does not have")
    rank, alpha = kwargs["r"], kwargs["lora_alpha"]
    patterns = {k: v for k, v in {**(kwargs.get("rank_pattern") or {}), **(kwargs.get("alpha_pattern") or {})}.items()}
    if patterns:
        raise TunerFileError(f"{path.name}: the rank or alpha of its {part} LoRA differs between layers "
                             f"({len(patterns)} layers differ from rank {rank}, alpha {alpha:g}); a restuning LoRA has one "
                             "rank and one alpha: load it with diffusers' pipe.load_lora_weights instead")
    if not math.isfinite(float(alpha)):
        raise TunerFileError(f"{path.name}: its alpha is {float(alpha)}, not a finite number; a LoRA's alpha is a positive "
                             "whole number (often its rank)")
    if float(alpha) != int(alpha) or alpha <= 0:
        raise TunerFileError(f"{path.name}: its alpha is {alpha:g}; a restuning LoRA's alpha is a positive whole number")
    return int(rank), int(alpha)


def _check_fit(path: Path, model, state: dict, targets: list[str], part: str) -> None:
    """Every layer the file changes is in `model`, with the sizes its weights were made for."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    modules = dict(model.named_modules())
    absent = [t for t in targets if t not in modules]
    if absent:
        raise TunerFileError(f"{path.name} was made for another model: {len(absent)} of the {len(targets)} {part} layers "
                             f"it changes are not in this one (e.g. {absent[0]})")
    for target in targets:
        module = modules[target]
        weight = (module.get_base_layer() if isinstance(module, BaseTunerLayer) else module).weight
        down, up = state.get(f"{target}.lora_A.weight"), state.get(f"{target}.lora_B.weight")
        if down is None or up is None:
            raise TunerFileError(f"{path.name}: the {part} layer {target} has {'no down' if down is None else 'no up'} weight")
        if down.shape[1] != weight.shape[1] or up.shape[0] != weight.shape[0] or down.ndim != weight.ndim:
            raise TunerFileError(f"{path.name} was made for another model: the {part} layer {target} maps "
                                 f"{down.shape[1]} -> {up.shape[0]} features in the file, {weight.shape[1]} -> "
                                 f"{weight.shape[0]} in this model (an SDXL or SD 2.x LoRA on an SD 1.x model, or the reverse)")


def _compact(model, targets: list[str], usual: tuple[str, ...], usual_text: str, prefixes: tuple[str, ...] = ("",)) -> str:
    """`usual_text` when the file covers exactly the layers the `usual` endings name in `prefixes`,
    as a LoRA trained here does (the config then reads like one); else the layers' full names."""
    from .model import target_layers

    return usual_text if sorted(target_layers(model, usual, prefixes)) == targets else ",".join(targets)
