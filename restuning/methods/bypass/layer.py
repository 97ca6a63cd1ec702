"""The bypass network of Res-Tuning-Bypass (Section 3.2, Fig. 3c), as plain modules that read
feature maps and know nothing of the U-Net they came from.

With x_0 the input of the first tap, x_1..x_L the backbone's (detached) outputs at the taps and
c the (detached) text embeddings:

    x_0^b = x_0
    x_l^b = λ_l·H_l(x_l) + (1-λ_l)·V_l(R_l(x_{l-1}^b)),   λ_l = sigmoid(a_l), a_l = 0  (Eq. 8)

H_l and V_l are Res-Tuners beside an identity OP (Eq. 7): H(x) = x + h(x) [+ t(x, c)],
V(s) = s + v(s), with h, v a Convpass (blocks.py), or an Adapter, Res-Prefix or Res-Prompt
(restuning.tuners) applied to the map's H·W tokens. With `text`, t is a Res-Tuner beside the
backbone's cross-attention: its own W_q reads x, its own W_k, W_v read c. R_l brings the state to
tap l's channels and resolution: a 1x1 channel map (none when the channels agree; initialised to
average or repeat channel groups, so the state keeps its scale), bilinear resizing, and a
depthwise 3x3 conv initialised to the identity. Nothing here is a dense 3x3 conv at the
backbone's width: those would cost 14.7M parameters each at 1280 channels.

What reaches the backbone. The caller adds a correction Δ at the injection point (the head's
input, or an up block's input), whose input there is x_L:

    'zero-conv' (default)  Δ = Z(SiLU(GN(x_L^b)))    Z a 3x3 conv (1x1 past 320 channels), zero at start
    'gate'                 Δ = g ⊙ (x_L^b − x_L)     g ∈ R^C, zero at start

Both give Δ = 0 at attach, so the output is the base model's bit for bit. Only Z (or g) starts
at zero: the tuners behind it start live (their output layers randomly initialised, as identity
no longer depends on them), so once the first optimiser step has moved Z every parameter has
gradient. Why the gate is not the default: docs/bypass.md.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...tuners import Adapter, Convpass, ResPrefix, ResPrompt, make_tuner
from . import variants
from .blocks import TextAttention

OUTPUTS = ("zero-conv", "gate", "modulate", "rearrange")
# Z is a 3x3 conv up to the width of SD's head input (320 channels: 0.92M parameters) and a 1x1
# conv at the wider inputs of deeper injection points (a 3x3 at 1280 channels would be 14.7M).
DENSE_3X3_MAX = 320


KINDS = ("convpass", "adapter", "prefix", "prompt")


def _make(kind: str, channels: int, dim: int, heads: int) -> nn.Module:
    return Convpass(channels, dim) if kind == "convpass" else make_tuner(kind, channels, dim, heads)


def _wake(module: nn.Module) -> None:
    """Start each tuner's zero-initialised output layer live: PyTorch's default init for layers,
    Res-Prefix's W_o at I/gain, so that it passes its (random) values' mixture as it is, and a
    module's own `wake()` where it has one."""
    for layer in module.modules():
        if isinstance(layer, (Convpass, Adapter)):
            layer.up.reset_parameters()
        elif isinstance(layer, (ResPrompt, TextAttention)):
            layer.out.reset_parameters()
        elif hasattr(layer, "wake"):
            layer.wake()
        elif isinstance(layer, ResPrefix):
            with torch.no_grad():
                layer.out.weight.copy_(torch.eye(layer.out.in_features) / layer.gain)
                layer.out.bias.zero_()


def apply_tuner(tuner: nn.Module, x: Tensor) -> Tensor:
    """A tuner on a feature map (B, C, H, W): Convpass reads the map, the others its H·W tokens."""
    if isinstance(tuner, Convpass):
        return tuner(x)
    b, _, h, w = x.shape
    out = tuner(x.flatten(2).transpose(1, 2))
    return out.transpose(1, 2).reshape(b, out.shape[-1], h, w)


class ChannelMap(nn.Module):
    """A 1x1 projection between channel counts, starting as a group average (fewer channels) or a
    repetition (more), so the bypass state keeps its scale through the chain."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, out_channels, 1)
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
                self.proj.weight.copy_(weight[:, :, None, None])
                self.proj.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class Resampler(nn.Module):
    """R_l: channels first (at the lower resolution, where it is cheaper), then size (bilinear
    up, mean-pooled down), then a depthwise 3x3 smoothing that starts as the identity."""

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
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            else:
                x = F.adaptive_avg_pool2d(x, size)
        return self.smooth(x)


class BypassStage(nn.Module):
    """One l of Eq. 8 (with `film`, the stage's output x_l^b goes through a FiLM of the time embedding)."""

    def __init__(self, in_channels: int, channels: int, horizontal: str, vertical: str, dim: int, heads: int,
                 text_channels: int | None = None, film: nn.Module | None = None):
        super().__init__()
        self.resample = Resampler(in_channels, channels)
        self.horizontal = _make(horizontal, channels, dim, heads)
        self.vertical = _make(vertical, channels, dim, heads)
        self.text = TextAttention(channels, text_channels, heads=heads) if text_channels else None
        self.film = film
        self.mix = nn.Parameter(torch.zeros(()))  # a_l: λ = sigmoid(0) = 0.5 at start

    def forward(self, feature: Tensor, state: Tensor, text: Tensor | None = None, temb: Tensor | None = None) -> Tensor:
        state = self.resample(state, feature.shape[-2:])
        across = feature + apply_tuner(self.horizontal, feature)
        if self.text is not None:
            across = across + self.text(feature, text)
        lam = torch.sigmoid(self.mix)
        out = lam * across + (1 - lam) * (state + apply_tuner(self.vertical, state))
        return self.film(out, temb) if self.film is not None else out


class BypassNetwork(nn.Module):
    """The whole chain: reads x_0, x_1..x_L (and c, and the time embedding e), returns Δ.

    `channels`: x_0's channel count, then each tap's. `text_channels`: the width of the text
    embeddings the text tuners read (None: no text tuners). `out_channels`: Δ's channels when they
    differ from x_L's (a correction of the U-Net's output). The rest are the ablation's options
    (variants.py): `time` 'out' or 'all' FiLMs of e, `refine` blocks, `readouts` from every stage.
    """

    def __init__(self, channels: list[int], horizontal: str, vertical: str, dim: int, heads: int,
                 output: str = "zero-conv", text_channels: int | None = None, *, out_channels: int | None = None,
                 time: str = "none", time_channels: int | None = None, refine: int = 0, readouts: bool = False,
                 trigger: bool = False):
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"unknown bypass output {output!r}; choose from {', '.join(OUTPUTS)}")
        if time != "none" and not time_channels:
            raise ValueError("a time-conditioned bypass needs the time embedding's width")
        self.output, self.time = output, time
        self.stages = nn.ModuleList(
            BypassStage(c_in, c_out, horizontal, vertical, dim, heads, text_channels,
                        variants.Film(time_channels, c_out) if time == "all" else None)
            for c_in, c_out in zip(channels, channels[1:])
        )
        last = channels[-1]
        self.refine = nn.ModuleList(variants.Refine(last, dim, heads, text_channels, time_channels if time != "none" else None)
                                    for _ in range(refine))
        self.trigger = variants.TokenGate(text_channels) if trigger and text_channels else None
        self.readouts = nn.ModuleList(variants.readout(c, out_channels or last) for c in channels[1:-1]) if readouts else None
        if output == "gate":
            self.gate = nn.Parameter(torch.zeros(last))
            return
        kernel = 3 if last <= DENSE_3X3_MAX else 1
        width = 2 * last if output == "modulate" else out_channels or last
        # GN, SiLU, Z: a Sequential whose state keys (out.0, out.2) every format-3 file holds
        z = nn.Identity() if output == "rearrange" else nn.Conv2d(last, width, kernel, padding=kernel // 2)
        self.out = nn.Sequential(nn.GroupNorm(math.gcd(32, last), last), nn.SiLU(), z)
        if isinstance(z, nn.Conv2d):
            nn.init.zeros_(z.weight)
            nn.init.zeros_(z.bias)
        self.out_film = variants.Film(time_channels, last) if time != "none" else None
        self.arrange = variants.Rearrange(last, heads=heads) if output == "rearrange" else None
        _wake(self.stages)
        _wake(self.refine)
        if self.out_film is not None and self.arrange is None:
            self.out_film.wake()

    @property
    def uses_text(self) -> bool:
        return self.stages[0].text is not None

    @property
    def uses_time(self) -> bool:
        return self.time != "none"

    def forward(self, x0: Tensor, features: list[Tensor], text: Tensor | None = None, temb: Tensor | None = None) -> Tensor:
        dtype = self.stages[0].mix.dtype
        state = x0.to(dtype)
        features = [f.to(dtype) for f in features]
        if self.uses_text:
            if text is None:
                raise ValueError("this bypass reads the text embeddings; none were given")
            text = text.to(dtype)
        if self.uses_time:
            if temb is None:
                raise ValueError("this bypass reads the time embedding; none was given")
            temb = temb.to(dtype)
        states = []
        for stage, feature in zip(self.stages, features, strict=True):
            state = stage(feature, state, text, temb)
            states.append(state)
        for block in self.refine:
            state = block(state, text, temb)
        if self.output == "gate":
            return self.gate.view(1, -1, 1, 1) * (state - features[-1])
        x = self.out[0](state)
        if self.out_film is not None:
            x = self.out_film(x, temb)
        x = self.out[1](x)
        if self.arrange is not None:
            return self.arrange(x, features[-1])
        out = self.out[2](x)
        if self.output == "modulate":
            scale, shift = out.chunk(2, dim=1)
            out = features[-1] * scale + shift
        for head, earlier in zip(self.readouts or [], states):
            out = out + F.interpolate(head(earlier), size=out.shape[-2:], mode="bilinear", align_corners=False)
        if self.trigger is not None:
            out = out * self.trigger(text).to(out.dtype)
        return out
