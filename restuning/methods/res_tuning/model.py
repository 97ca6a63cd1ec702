"""Attach Res-Tuners beside OPs of a U-Net: x' = OP(x) + Res-Tuner(x) (Eq. 7).

The OPs are the transformer blocks' self-attention, cross-attention, feed-forward network and the
whole block, and the ResNet blocks (beside which the Res-Adapter is convolutional: Convpass). The
tuner modules live inside the OP module (`<op>.restuners.<name>`), so they move with the U-Net
across devices; a forward hook on the OP adds their residual. Tuner weights are created in fp32
whatever the U-Net's dtype, and their output is cast to the OP's output dtype.

With an identifier (config.identifier), its input embedding in the text encoder(s) trains too
(restuning.identifier); those rows are part of the same handle, file and strength.
"""

from __future__ import annotations

from torch import nn

from ...core import AttachError, Attached, add_residual, op_module, resnet_blocks, transformer_blocks
from ...identifier import attach_identifier
from ...tuners import Convpass, make_tuner


def attach(unet: nn.Module, config, name: str, text_encoders: dict | None = None) -> Attached:
    """`text_encoders`: {pipeline attribute: (text encoder, tokenizer)}, needed when the config
    names an identifier (restuning.api passes the pipeline's)."""
    handle = Attached(name=name, config=config)
    device = next(unet.parameters()).device
    block_ops = {op: kind for op, kind in config.tuners.items() if op != "resnet"}
    if block_ops:
        for path, block in transformer_blocks(unet, config.blocks):
            channels = block.norm1.normalized_shape[0]
            for op_name, kind in block_ops.items():
                op = op_module(block, op_name)
                if op is None:
                    continue  # e.g. attn2 in a block without cross-attention
                _add(handle, op, f"{path}.{op_name}", make_tuner(kind, channels, config.dim, config.heads).to(device))
    if "resnet" in config.tuners:
        found = resnet_blocks(unet, config.blocks)
        if not found:
            raise AttachError(f"the U-Net has no ResNet blocks in {', '.join(config.blocks)}")
        for path, resnet in found:
            _add(handle, resnet, f"{path}.resnet", Convpass(resnet.in_channels, config.resnet_dim, resnet.out_channels).to(device))
    if config.identifier and config.identifier != "auto":
        attach_identifier(handle, config.identifier, text_encoders or {}, unet)
    return handle


def _add(handle: Attached, op: nn.Module, key: str, tuner: nn.Module) -> None:
    if not hasattr(op, "restuners"):
        op.restuners = nn.ModuleDict()
    op.restuners[handle.name] = tuner

    def undo():
        del op.restuners[handle.name]
        if len(op.restuners) == 0:
            del op.restuners

    handle.undo.append(undo)
    handle.handles.append(op.register_forward_hook(_hook(tuner, handle), with_kwargs=True))
    handle.modules[key] = tuner


def _hook(tuner: nn.Module, handle: Attached):
    def hook(module, args, kwargs, output):
        # a transformer OP's hidden_states, a ResNet's input_tensor: its first argument either way
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("input_tensor"))
        dtype = next(tuner.parameters()).dtype
        return add_residual(output, lambda: tuner(x.to(dtype)), handle.name, handle.scale)

    return hook
