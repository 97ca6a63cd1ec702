"""Bound Adapter baseline (Houlsby et al.): a bottleneck MLP *sequential* after the OP,
y = OP(x) + φ(OP(x) W_down) W_up, by default after the feed-forward network.
Its parallel rewriting is Eq. 6 (`restuning.unbinding.parallel_adapter`).
"""

from torch import nn

from ...core import Attached, add_residual, op_module, transformer_blocks
from ...tuners import Adapter
from .config import AdapterConfig


def attach(unet: nn.Module, config: AdapterConfig, name: str) -> Attached:
    handle = Attached(name=name, config=config)
    device = next(unet.parameters()).device
    for path, block in transformer_blocks(unet, config.blocks):
        channels = block.norm1.normalized_shape[0]
        for op_name in config.ops:
            op = op_module(block, op_name)
            if op is None:
                continue
            adapter = Adapter(channels, config.dim).to(device)
            op.add_module(f"adapter_{name}", adapter)
            handle.undo.append(lambda op=op: delattr(op, f"adapter_{name}"))
            handle.handles.append(op.register_forward_hook(_sequential(adapter, handle)))
            handle.modules[f"{path}.{op_name}"] = adapter
    return handle


def _sequential(adapter: nn.Module, handle: Attached):
    def hook(module, args, output):
        dtype = adapter.up.weight.dtype
        return add_residual(output, lambda: adapter(output.to(dtype)), handle.name, handle.scale)

    return hook
