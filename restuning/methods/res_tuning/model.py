"""Attach Res-Tuners beside OPs of a U-Net's transformer blocks: x' = OP(x) + Res-Tuner(x) (Eq. 7).

The tuner modules live inside the OP module (`<op>.restuners.<name>`), so they move with the
U-Net across devices; a forward hook on the OP adds their residual. Tuner weights are created in
fp32 whatever the U-Net's dtype, and their output is cast to the OP's output dtype.
"""

from __future__ import annotations

from torch import nn

from ...core import Attached, add_residual, op_module, transformer_blocks
from ...tuners import make_tuner


def attach(unet: nn.Module, config, name: str) -> Attached:
    handle = Attached(name=name, config=config)
    device = next(unet.parameters()).device
    for path, block in transformer_blocks(unet, config.blocks):
        channels = block.norm1.normalized_shape[0]
        for op_name, kind in config.tuners.items():
            op = op_module(block, op_name)
            if op is None:
                continue  # e.g. attn2 in a block without cross-attention
            tuner = make_tuner(kind, channels, config.dim, config.heads).to(device)
            _hold(op, name, tuner, handle)
            handle.handles.append(op.register_forward_hook(_hook(tuner, handle), with_kwargs=True))
            handle.modules[f"{path}.{op_name}"] = tuner
    return handle


def _hold(op: nn.Module, name: str, tuner: nn.Module, handle: Attached) -> None:
    if not hasattr(op, "restuners"):
        op.restuners = nn.ModuleDict()
    op.restuners[name] = tuner

    def undo():
        del op.restuners[name]
        if len(op.restuners) == 0:
            del op.restuners

    handle.undo.append(undo)


def _hook(tuner: nn.Module, handle: Attached):
    def hook(module, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        dtype = next(tuner.parameters()).dtype
        return add_residual(output, lambda: tuner(x.to(dtype)), handle.name, handle.scale)

    return hook
