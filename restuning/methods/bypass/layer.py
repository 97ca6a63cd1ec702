"""The bypass network of Res-Tuning-Bypass (Section 3.2, Fig. 3c), as plain modules that read
feature maps and know nothing of the U-Net they came from.

With x_0 the input of the first tap and x_1..x_L the backbone's (detached) outputs at the taps:

    x_0^b = x_0
    x_l^b = λ_l·H_l(x_l) + (1-λ_l)·V_l(R_l(x_{l-1}^b)),   λ_l = sigmoid(a_l), a_l = 0  (Eq. 8)

H_l and V_l are Res-Tuners beside an identity OP (Eq. 7): H(x) = x + h(x), V(s) = s + v(s), with
h, v an Adapter, Res-Prefix or Res-Prompt (restuning.tuners) applied to the map's H·W tokens.
R_l brings the state to tap l's channels and resolution: a 1x1 channel map (none when the
channels already agree; initialised to average or repeat channel groups, so the state keeps its
scale), nearest resizing, and a depthwise 3x3 conv initialised to the identity, which lets the
vertical path smooth what nearest upsampling makes blocky. Nothing here is a dense 3x3 conv:
those would cost 14.7M parameters each at 1280 channels.

Exact identity at attach. With λ = 0.5 the last state x_L^b is a blend of every tap, not x_L, so
feeding it to the head as is (ms-swift's design) cannot reproduce the base model, and neither
can the residual form H(x) = x + h(x) alone. The network therefore returns a correction

    Δ = g ⊙ (x_L^b − x_L)          g ∈ R^C, zero-initialised

that the caller adds to the head's input: head(x_L + s·Δ), s the strength. At attach g = 0, so
Δ = 0 and the output is the base model's bit for bit; at g = 1 the head reads the paper's x_L^b
exactly. g is per channel, so training moves each channel from the backbone to the bypass at
its own pace, and λ keeps its meaning and its 0.5 start.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...tuners import make_tuner


def on_tokens(tuner: nn.Module, x: Tensor) -> Tensor:
    """Apply a token tuner (…, N, C) to a feature map (B, C, H, W)."""
    b, _, h, w = x.shape
    out = tuner(x.flatten(2).transpose(1, 2))
    return out.transpose(1, 2).reshape(b, out.shape[-1], h, w)


class ChannelMap(nn.Module):
    """A 1x1 projection between channel counts, starting as a group average (fewer channels) or a
    repetition (more), so the bypass state keeps its scale through the chain."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.proj = nn.Linear(in_channels, out_channels)
        big, small = max(in_channels, out_channels), min(in_channels, out_channels)
        if big % small == 0:
            group = big // small
            with torch.no_grad():
                if in_channels > out_channels:
                    grouping = torch.arange(in_channels) // group
                    weight = (grouping.unsqueeze(0) == torch.arange(out_channels).unsqueeze(1)).float() / group
                else:
                    grouping = torch.arange(out_channels) // group
                    weight = (grouping.unsqueeze(1) == torch.arange(in_channels).unsqueeze(0)).float()
                self.proj.weight.copy_(weight)
                self.proj.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return on_tokens(self.proj, x)


class Resampler(nn.Module):
    """R_l: channels first (at the lower resolution, where it is cheaper), then size, then a
    depthwise 3x3 smoothing that starts as the identity."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.channels = ChannelMap(in_channels, out_channels) if in_channels != out_channels else nn.Identity()
        self.smooth = nn.Conv2d(out_channels, out_channels, 3, padding=1, groups=out_channels)
        with torch.no_grad():
            self.smooth.weight.zero_()
            self.smooth.weight[:, 0, 1, 1] = 1.0
            self.smooth.bias.zero_()

    def forward(self, x: Tensor, size: torch.Size) -> Tensor:
        x = self.channels(x)
        if x.shape[-2:] != size:
            if x.shape[-2] < size[0]:
                x = F.interpolate(x, size=size, mode="nearest")
            else:
                x = F.adaptive_avg_pool2d(x, size)
        return self.smooth(x)


class BypassStage(nn.Module):
    """One l of Eq. 8."""

    def __init__(self, in_channels: int, channels: int, horizontal: str, vertical: str, dim: int, heads: int):
        super().__init__()
        self.resample = Resampler(in_channels, channels)
        self.horizontal = make_tuner(horizontal, channels, dim, heads)
        self.vertical = make_tuner(vertical, channels, dim, heads)
        self.mix = nn.Parameter(torch.zeros(()))  # a_l: λ = sigmoid(0) = 0.5 at start

    def forward(self, feature: Tensor, state: Tensor) -> Tensor:
        state = self.resample(state, feature.shape[-2:])
        lam = torch.sigmoid(self.mix)
        return lam * (feature + on_tokens(self.horizontal, feature)) + (1 - lam) * (state + on_tokens(self.vertical, state))


class BypassNetwork(nn.Module):
    """The whole chain: reads x_0 and x_1..x_L, returns the head-input correction Δ."""

    def __init__(self, channels: list[int], horizontal: str, vertical: str, dim: int, heads: int):
        """`channels`: x_0's channel count, then each tap's."""
        super().__init__()
        self.stages = nn.ModuleList(
            BypassStage(c_in, c_out, horizontal, vertical, dim, heads) for c_in, c_out in zip(channels, channels[1:])
        )
        self.gate = nn.Parameter(torch.zeros(channels[-1]))

    def forward(self, x0: Tensor, features: list[Tensor]) -> Tensor:
        dtype = self.gate.dtype
        state = x0.to(dtype)
        features = [f.to(dtype) for f in features]
        for stage, feature in zip(self.stages, features, strict=True):
            state = stage(feature, state)
        return self.gate.view(1, -1, 1, 1) * (state - features[-1])
