"""LoRA through peft (never hand-written): low-rank updates of the attention projections of the
chosen U-Net parts (or of the layers `targets` names), injected with diffusers' `unet.add_adapter`;
optionally of the text encoder's layers too, injected with transformers' `text_encoder.add_adapter`
as diffusers' train_dreambooth_lora.py does.

One handle covers both models: its state dict holds the U-Net's peft keys as they are and the text
encoder's under `text_encoder.` (no U-Net layer path starts with that), so a tuner file, a
checkpoint and `set_scale` treat the pair as one tuner.

peft wraps each target layer (`to_q` becomes `to_q.base_layer` beside `to_q.lora_A.<name>`), so
`unet.save_pretrained` would write a checkpoint whose base weights diffusers does not find: it
loads it with those layers randomly initialised and a warning. `keep_lora_out_of_state` keeps the
U-Net's (and text encoder's) own state the base model's while this library's LoRAs are attached,
as for every other method; their weights go through the handle (`restuning.save` / `load`).
peft's own get/set_peft_model_state_dict read the adapters from `model.state_dict()`, so this
module calls them inside `peft_view`; called directly on this library's LoRAs they see none.
"""

from collections.abc import Callable, Iterable
from contextlib import contextmanager

import torch
from torch import nn

from ...core import BLOCK_GROUPS, AttachError, Attached, attached
from ...io import MAX_WEIGHT, TunerFileError
from .config import LoraConfig

TARGET_SUFFIXES = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_PREFIX = "text_encoder."
TEXT_ENCODER_2_PREFIX = "text_encoder_2."  # SDXL's second text encoder


def split_names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


def _matches(path: str, wanted: tuple[str, ...]) -> bool:
    # peft's rule for target_modules: the whole name, or its ending after a dot
    return any(path == w or path.endswith("." + w) for w in wanted)


class LoraAttached(Attached):
    routable = False

    def __init__(self, unet: nn.Module, name: str, config: LoraConfig, text_encoder: nn.Module | None = None,
                 text_encoder_2: nn.Module | None = None):
        super().__init__(name=name, config=config)
        self.unet = unet
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2

    def _models(self):
        """(model, key prefix) of the U-Net and of each tuned text encoder."""
        return [(self.unet, "")] + [(m, prefix) for m, prefix in ((self.text_encoder, TEXT_ENCODER_PREFIX),
                                                                   (self.text_encoder_2, TEXT_ENCODER_2_PREFIX)) if m is not None]

    def text_encoders(self) -> list[tuple[str, nn.Module]]:
        """(pipeline attribute, model) of each tuned text encoder."""
        return [(prefix[:-1], model) for model, prefix in self._models()[1:]]

    def parameters(self):
        return (p for model, _ in self._models() for n, p in model.named_parameters() if f".{self.name}." in n and "lora_" in n)

    def state_dict(self):
        return {prefix + k: v for model, prefix in self._models() for k, v in lora_state(model, self.name).items()}

    def load_state_dict(self, state):
        from peft.utils import set_peft_model_state_dict

        expected = self.state_dict()
        if set(expected) != set(state):
            missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
            raise ValueError(f"LoRA weights do not fit this model: {len(missing)} missing (e.g. {missing[:2]}), "
                             f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})")
        for key, tensor in state.items():
            if tensor.shape != expected[key].shape:
                raise ValueError(f"LoRA weight {key} has shape {tuple(tensor.shape)}, model expects {tuple(expected[key].shape)}")
        for model, prefix in self._models():
            part = {k[len(prefix):]: v for k, v in state.items() if _part_of(k) == prefix}
            with peft_view(model):
                set_peft_model_state_dict(model, part, adapter_name=self.name)

    def set_scale(self, scale):
        """Strength `scale`; at 0 the LoRA leaves peft's active adapters altogether, so it is not
        computed at all: peft would add 0 x its output, and 0 x NaN (a LoRA whose output overflows)
        is NaN, which would turn every image of the call black."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        super().set_scale(scale)
        for model, _ in self._models():
            for module in model.modules():
                if isinstance(module, BaseTunerLayer) and self.name in module.scaling:
                    module.set_scale(self.name, self.scale)
        _activate_all(self.unet)
        for _, model in self.text_encoders():
            _activate_all(model, owner=self.unet)

    def detach(self):
        self.unet.delete_adapters(self.name)
        _activate_all(self.unet, exclude=self.name)
        for _, model in self.text_encoders():
            model.delete_adapter(self.name)
            _activate_all(model, exclude=self.name, owner=self.unet)


def check_updates(config: LoraConfig, keys: Iterable[str], get: Callable[[str], torch.Tensor], label: str) -> None:
    """TunerFileError unless each layer's update at strength 1, alpha / rank x B A (the weight peft
    adds to the layer's own), is at most restuning.io.MAX_WEIGHT in magnitude, as check_tensors
    holds each weight: finite weights under an alpha far beyond the rank (1e30) render black too.
    `keys` are a LoRA state's keys, `get` reads one tensor (one layer's pair is in memory at a
    time); a zero update (an untrained B) passes whatever alpha scales it. Called after
    check_tensors, which names non-finite weights as such."""
    scale = config.alpha / config.rank
    for down_key in sorted(k for k in keys if k.endswith(".lora_A.weight")):
        up_key = down_key.removesuffix(".lora_A.weight") + ".lora_B.weight"
        down, up = get(down_key).double().flatten(1), get(up_key).double().flatten(1)
        if not (down.numel() and up.numel()):
            continue
        # |(B A)_ij| <= |B_i| |A_j| (Cauchy-Schwarz): when the largest row and column norms clear the
        # bound, so does every entry, and the product (seconds for an SDXL LoRA's layers) is not formed
        if float(up.norm(dim=1).max() * down.norm(dim=0).max()) * scale <= MAX_WEIGHT:
            continue
        largest = float((up @ down).abs().max()) * scale
        if not largest <= MAX_WEIGHT:  # NaN too
            layer = down_key.removesuffix(".lora_A.weight")
            raise TunerFileError(f"{label}: its update of {layer} (alpha {config.alpha:.6g} / rank {config.rank} x its weights) "
                                 f"reaches {largest:.3g}, beyond ±{MAX_WEIGHT:,.0f}, the largest number half precision holds; "
                                 "such a LoRA would turn images black")


def _part_of(key: str) -> str:
    """The key prefix of the model a handle's state key belongs to ('' for the U-Net)."""
    return next((p for p in (TEXT_ENCODER_PREFIX, TEXT_ENCODER_2_PREFIX) if key.startswith(p)), "")


def _activate_all(model: nn.Module, exclude: str | None = None, owner: nn.Module | None = None) -> None:
    """Keep every attached LoRA of nonzero strength active at once; each one's strength is its
    scale, and one at 0 is inactive (LoraAttached.set_scale).

    peft activates only the newest adapter by default (and another one when an active adapter
    is deleted), which would silently switch off LoRAs attached earlier. `owner` is the U-Net
    whose table lists the tuners, when `model` is a text encoder. peft's set_adapter also marks
    the active adapters trainable: whether each weight trains is kept as it was.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    table = attached(owner if owner is not None else model)
    active = [n for n, a in table.items() if isinstance(a, LoraAttached) and n != exclude and a.scale != 0]
    trains = {p: p.requires_grad for p in model.parameters()}
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.set_adapter([n for n in active if n in module.lora_A])
    for p, flag in trains.items():
        p.requires_grad_(flag)


def lora_state(model: nn.Module, name: str) -> dict:
    """peft's state dict of the LoRA `name` in `model` (adapter names taken out of the keys)."""
    from peft.utils import get_peft_model_state_dict

    with peft_view(model):
        return get_peft_model_state_dict(model, adapter_name=name)


_STATE_HOOKS = "_restuning_lora_state_hooks"
_PEFT_VIEW = "_restuning_peft_view"


@contextmanager
def peft_view(model: nn.Module):
    """peft saves and loads adapters through `model.state_dict()` (it maps checkpoint keys to the
    model's from it): within this block the state shows this library's LoRAs as peft names them."""
    model.__dict__[_PEFT_VIEW] = model.__dict__.get(_PEFT_VIEW, 0) + 1
    try:
        yield
    finally:
        model.__dict__[_PEFT_VIEW] -= 1


def keep_lora_out_of_state(model: nn.Module, owner: nn.Module) -> None:
    """While LoRAs attached by this library live in `model` (the U-Net `owner`, or its text
    encoder), `model.state_dict()` is the base model's: their lora_A/lora_B weights are left out
    and a wrapped layer's `base_layer.` keys take the layer's own names again. A base checkpoint
    loads into `model` strictly, into the wrapped layers' base weights. Layers that also carry
    LoRAs attached by other means (diffusers' `add_adapter`) are left as peft names them; a layer
    left without any adapter (peft keeps its wrapper after `detach`) has its base names back.
    """
    if _STATE_HOOKS in model.__dict__:
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    def wrapped(prefix: str):
        ours = {n for n, a in attached(owner).items() if isinstance(a, LoraAttached)}
        for path, m in model.named_modules():
            if isinstance(m, BaseTunerLayer) and hasattr(m, "lora_A"):
                adapters = set(m.lora_A)
                # A layer left without adapters (peft keeps the wrapper) is the base layer again.
                if adapters <= ours or adapters & ours:
                    yield f"{prefix}{path}.", adapters & ours, adapters <= ours

    def lora_key(rest: str, mine: set) -> bool:
        part, _, tail = rest.partition(".")
        return part.startswith("lora_") and tail.partition(".")[0] in mine

    def hide(module, state, prefix, local_metadata):
        if model.__dict__.get(_PEFT_VIEW):
            return
        for path, mine, only_ours in wrapped(prefix):
            for key in [k for k in state if k.startswith(path)]:
                rest = key[len(path):]
                if lora_key(rest, mine):
                    del state[key]
                elif only_ours and rest.startswith("base_layer."):
                    state[path + rest.removeprefix("base_layer.")] = state.pop(key)

    def unhide(module, state, prefix, local_metadata, strict, missing, unexpected, errors):
        if model.__dict__.get(_PEFT_VIEW):
            return
        for path, _, only_ours in wrapped(prefix):
            if only_ours:
                for key in [k for k in state if k.startswith(path) and not k[len(path):].startswith(("base_layer.", "lora_"))]:
                    state[path + "base_layer." + key[len(path):]] = state.pop(key)

    def allow_missing(module, incompatible):
        if model.__dict__.get(_PEFT_VIEW):
            return
        paths = list(wrapped(""))
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys
                                        if not any(k.startswith(p) and lora_key(k[len(p):], mine) for p, mine, _ in paths)]

    model.__dict__[_STATE_HOOKS] = (model.register_state_dict_post_hook(hide),
                                    model.register_load_state_dict_pre_hook(unhide),
                                    model.register_load_state_dict_post_hook(allow_missing))


def target_layers(model: nn.Module, wanted: tuple[str, ...], prefixes: tuple[str, ...] = ("",), *,
                  kinds=(nn.Linear, nn.Conv2d)) -> list[str]:
    """The layers of `model` under `prefixes` whose names match `wanted` (peft's target_modules rule)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    # A layer that already carries another LoRA is peft's wrapper, not a plain layer.
    return [n for n, m in model.named_modules()
            if n.startswith(prefixes) and _matches(n, wanted) and isinstance(m, (*kinds, BaseTunerLayer))]


def _all_found(wanted: tuple[str, ...], found: list[str], where: str) -> None:
    """Every name asked for matches a layer: one that matches none is a typo, not a choice."""
    missing = [w for w in wanted if not any(_matches(f, (w,)) for f in found)]
    if missing:
        raise AttachError(f"no layers named {', '.join(missing)} found {where} (the other names match)")


def _text_targets(config: LoraConfig, encoders: dict) -> dict:
    """{prefix: (model, its layers)} of each text encoder the config tunes; AttachError when one is
    not given or has none of the layers named."""
    out = {}
    for field, prefix, what in (("text_encoder", TEXT_ENCODER_PREFIX, "text_encoder=pipe.text_encoder"),
                                ("text_encoder_2", TEXT_ENCODER_2_PREFIX, "text_encoder_2=pipe.text_encoder_2 (SDXL's second)")):
        wanted = getattr(config, field)
        if not wanted:
            continue
        model = encoders[field]
        if model is None:
            raise AttachError(f"this LoRA tunes the {field.replace('_', ' ')} too ({wanted}): pass {what}")
        layers = target_layers(model, split_names(wanted))
        if not layers:
            raise AttachError(f"no {field.replace('_', ' ')} layers named {wanted} found")
        _all_found(split_names(wanted), layers, f"in the {field.replace('_', ' ')}")
        out[prefix] = (model, layers)
    return out


def attach(unet: nn.Module, config: LoraConfig, name: str, text_encoder: nn.Module | None = None,
           text_encoder_2: nn.Module | None = None) -> Attached:
    from peft import LoraConfig as PeftLoraConfig

    prefixes = tuple(BLOCK_GROUPS[g] for g in config.blocks)
    wanted = split_names(config.targets) or TARGET_SUFFIXES
    targets = target_layers(unet, wanted, prefixes, kinds=(nn.Linear,) if not config.targets else (nn.Linear, nn.Conv2d))
    if not targets:
        raise AttachError(f"no layers named {', '.join(wanted)} found in {', '.join(config.blocks)}")
    _all_found(wanted, targets, f"in {', '.join(config.blocks)}")
    texts = _text_targets(config, {"text_encoder": text_encoder, "text_encoder_2": text_encoder_2})

    def peft_config(modules):
        return PeftLoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.lora_dropout, init_lora_weights="gaussian",
                              target_modules=modules)

    unet.add_adapter(peft_config(targets), adapter_name=name)
    done = []
    try:
        for model, layers in texts.values():
            model.add_adapter(peft_config(layers), adapter_name=name)
            done.append(model)
    except Exception:
        unet.delete_adapters(name)
        for model in done:
            model.delete_adapter(name)
        raise
    handle = LoraAttached(unet, name, config, *(texts.get(p, (None,))[0] for p in (TEXT_ENCODER_PREFIX, TEXT_ENCODER_2_PREFIX)))
    attached(unet)[name] = handle  # so that _activate_all sees it; attach() stores it again
    _activate_all(unet)
    keep_lora_out_of_state(unet, unet)
    for model, _ in texts.values():
        _activate_all(model, owner=unet)
        keep_lora_out_of_state(model, unet)
    return handle
