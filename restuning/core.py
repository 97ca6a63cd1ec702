"""Attaching methods to a U-Net, and taking them off again.

Every method (Res-Tuning, the Bypass, the bound baselines, LoRA, full fine-tuning) attaches
through `restuning.attach(unet, config, name)` (restuning/api.py), which returns an `Attached`
handle kept on the U-Net under `name`. The handle knows the method's trainable parameters, its
weights, its inference strength and how to undo itself, so `save`, `load`, `set_scale` and
`detach` are the same calls for all.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterable, Iterator

import torch
from torch import Tensor, nn

# The frozen operations a Res-Tuner can sit beside: a transformer block's self-attention, cross-
# attention, feed-forward network or the whole block, and the U-Net's ResNet blocks (the
# convolutional OPs of the paper's "Conditional 2D U-Net", Table 11).
OPS = ("attn1", "attn2", "ff", "block", "resnet")
BLOCK_GROUPS = {"down": "down_blocks.", "mid": "mid_block.", "up": "up_blocks."}
DEFAULT_NAME = "default"

_ATTACHED = "_restuning_attached"


class AttachError(RuntimeError):
    """Raised when attaching or detaching cannot be done as asked."""


@dataclass
class Attached:
    """What one attached method left on a U-Net: its modules, hooks, and how to undo them.

    `modules` maps a stable key (a path in the U-Net) to the module whose state is saved under it.
    """

    name: str
    config: object
    modules: dict[str, nn.Module] = field(default_factory=dict)
    handles: list = field(default_factory=list)
    undo: list[Callable[[], None]] = field(default_factory=list)
    scale: float = 1.0
    # Whether `route` can send single samples through this method (it reads `routing_of`).
    routable: ClassVar[bool] = True

    def parameters(self) -> Iterator[nn.Parameter]:
        for module in self.modules.values():
            yield from module.parameters()

    def state_dict(self) -> dict[str, Tensor]:
        return {f"{key}.{p}": t for key, m in self.modules.items() for p, t in m.state_dict().items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        expected = self.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"tuner weights do not fit this model: {len(missing)} missing (e.g. {missing[:2]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})"
            )
        for key, tensor in state.items():
            if tensor.shape != expected[key].shape:
                raise ValueError(f"tuner weight {key} has shape {tuple(tensor.shape)}, model expects {tuple(expected[key].shape)}")
        with torch.no_grad():
            for key, module in self.modules.items():
                prefix = key + "."
                module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})

    def set_scale(self, scale: float) -> None:
        self.scale = float(scale)

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        for undo in reversed(self.undo):
            undo()
        self.handles.clear()
        self.undo.clear()


def attached(unet: nn.Module) -> dict[str, Attached]:
    """The methods attached to `unet`, by name (empty if none)."""
    return unet.__dict__.setdefault(_ATTACHED, {})


_STATE_HOOKS = "_restuning_state_hooks"


def keep_tuners_out_of_state(model: nn.Module, owner: nn.Module | None = None) -> None:
    """Leave the modules of tuners attached to `owner` (default: `model`, a U-Net) out of
    `model.state_dict()`, and let a base checkpoint load into `model` strictly with them attached;
    `model` is the U-Net, or a text encoder holding a tuner's identifier embedding.

    The tuners must be submodules of the model so that `.to()`, `.parameters()` and accelerate's
    wrapping reach them, but then they would be written by `save_pretrained` into what is meant to
    be the base model. Their weights are saved by `restuning.save`. LoRA's peft layers are kept out
    by its own hooks (methods/lora/model.py); full fine-tuning's weights are the U-Net's own.
    """
    owner = model if owner is None else owner
    if _STATE_HOOKS in model.__dict__:
        return

    def tuner_paths(prefix: str) -> tuple[str, ...]:
        ids = {id(m) for a in attached(owner).values() for m in a.modules.values()}
        return tuple(f"{prefix}{path}." for path, m in model.named_modules(remove_duplicate=False) if id(m) in ids)

    def drop_from_state(module, state, prefix, local_metadata):
        paths = tuner_paths(prefix)
        for key in [k for k in state if k.startswith(paths)] if paths else []:
            del state[key]

    def allow_missing(module, incompatible):
        paths = tuner_paths("")
        if paths:
            incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not k.startswith(paths)]

    model.__dict__[_STATE_HOOKS] = (model.register_state_dict_post_hook(drop_from_state),
                                    model.register_load_state_dict_post_hook(allow_missing))


def detach(unet: nn.Module, name: str | None = None) -> None:
    """Remove one attached method (or all, with name=None) from a U-Net (or its pipeline); the
    model is the base model again."""
    table = attached(getattr(unet, "unet", unet))
    names = list(table) if name is None else [name]
    for n in names:
        if n not in table:
            raise AttachError(f"no tuner named {n!r} is attached (attached: {sorted(table) or 'none'})")
        table[n].detach()
        del table[n]


def set_scale(unet: nn.Module, scale: float, name: str | None = None) -> None:
    """Set the inference strength of tuners attached to a U-Net (or its pipeline): 1 as trained,
    0 exactly the base model."""
    table = attached(getattr(unet, "unet", unet))
    if not table:
        raise AttachError("no tuner is attached")
    for n in [name] if name is not None else list(table):
        table[n].set_scale(scale)


def trainable_parameters(unet: nn.Module) -> list[nn.Parameter]:
    return [p for p in unet.parameters() if p.requires_grad]


# -- where tuners go ---------------------------------------------------------------------------


def transformer_blocks(unet: nn.Module, groups: Iterable[str]) -> list[tuple[str, nn.Module]]:
    """(path, block) for every diffusers BasicTransformerBlock in the chosen parts of the U-Net."""
    from diffusers.models.attention import BasicTransformerBlock

    groups = tuple(groups)
    unknown = [g for g in groups if g not in BLOCK_GROUPS]
    if unknown:
        raise ValueError(f"unknown block group(s) {unknown}; choose from {', '.join(BLOCK_GROUPS)}")
    prefixes = tuple(BLOCK_GROUPS[g] for g in groups)
    found = [(n, m) for n, m in unet.named_modules() if isinstance(m, BasicTransformerBlock) and n.startswith(prefixes)]
    if not found:
        raise AttachError(f"the U-Net has no transformer blocks in {', '.join(groups)}")
    return found


def resnet_blocks(unet: nn.Module, groups: Iterable[str]) -> list[tuple[str, nn.Module]]:
    """(path, block) for every diffusers ResnetBlock2D in the chosen parts of the U-Net."""
    from diffusers.models.resnet import ResnetBlock2D

    prefixes = tuple(BLOCK_GROUPS[g] for g in groups)
    return [(n, m) for n, m in unet.named_modules() if isinstance(m, ResnetBlock2D) and n.startswith(prefixes)]


def op_module(block: nn.Module, op: str) -> nn.Module | None:
    """The OP `op` of a transformer block (None where it has none, e.g. attn2 without cross-attention)."""
    if op == "block":
        return block
    if op not in OPS:
        raise ValueError(f"unknown OP {op!r}; choose from {', '.join(OPS)}")
    return getattr(block, op, None)


# -- per-sample routing -------------------------------------------------------------------------

# Which tuner each sample of the batch goes through, within one `route` block: the flags per name
# (plain Python, so deciding whether a tuner runs never waits for the GPU) and, filled on first
# use, each name's mask and rows on the device (one host-to-device copy per block, not one per
# hooked module and step). A context variable, not a module attribute, so concurrent calls on one
# U-Net do not mix.
_routing: contextvars.ContextVar[dict | None] = contextvars.ContextVar("restuning_routing", default=None)


@dataclass(frozen=True)
class Routing:
    """Which samples of one call go through a tuner."""

    any: bool
    all: bool
    mask: Tensor | None = None  # (batch,) bool on the call's device; None when all or none do
    rows: Tensor | None = None  # the indices where mask is True


EVERY_SAMPLE = Routing(any=True, all=True)


@contextlib.contextmanager
def route(names: list[str | None]):
    """Within this block, sample i of every U-Net call goes through the tuner named names[i] only
    (None: the base model). Used to render several tuners side by side in one batched call.
    """
    flags = {n: tuple(m == n for m in names) for n in set(names) if n is not None}
    token = _routing.set({"flags": flags, "count": len(names), "cache": {}})
    try:
        yield
    finally:
        _routing.reset(token)


def routing_of(name: str, batch: int, device) -> Routing:
    """How the current `route` block (if any) sends this call's samples through tuner `name`."""
    table = _routing.get()
    if table is None:
        return EVERY_SAMPLE
    key = (name, batch, str(device))
    found = table["cache"].get(key)
    if found is not None:
        return found
    flags = table["flags"].get(name, (False,) * table["count"])
    # Classifier-free guidance doubles the batch as [uncond; cond]: the routing repeats.
    if batch % len(flags):
        raise AttachError(f"routing was given for {len(flags)} samples but the call has {batch}")
    flags = flags * (batch // len(flags))
    if all(flags) or not any(flags):
        found = Routing(any=any(flags), all=all(flags))
    else:
        found = Routing(any=True, all=False, mask=torch.tensor(flags, device=device),
                        rows=torch.tensor([i for i, f in enumerate(flags) if f], device=device))
    table["cache"][key] = found
    return found


def add_residual(output: Tensor, residual_fn: Callable[[], Tensor], name: str, scale: float, batch_rows: Tensor | None = None) -> Tensor:
    """output + scale·residual, honouring per-sample routing; scale 0 adds nothing at all."""
    if scale == 0:
        return output
    routing = routing_of(name, output.shape[0], output.device)
    if not routing.any:
        return output
    residual = residual_fn()
    if scale != 1:
        residual = residual * scale
    residual = residual.to(output.dtype)
    if routing.all:
        return output + residual
    return output + residual * routing.mask.view(-1, *([1] * (output.ndim - 1))).to(residual.dtype)
