"""Wiring Res-Tuning-Bypass networks into a diffusers `UNet2DConditionModel`.

Taps: x_0 is the input of the first tapped block (`mid_block` by default); x_1..x_L are the
outputs of `mid_block` and of the up blocks before the injection point (1280, 1280, 1280, 640,
320 channels at 8, 16, 32, 64, 64 px latent side for a 512 px image); c is the U-Net's
`encoder_hidden_states`. The bypass network (layer.py, Eq. 8) turns them into a correction Δ
added at the injection point, whose input is x_L:

    depth 0 (the paper's):  output = head(x_L + s·Δ)       head: conv_norm_out -> act -> conv_out
    depth k:                up_blocks[-k] reads x_L + s·Δ  (and the frozen blocks after it run as usual)
    into 'noise':           output = head(x_L) + s·Δ       (Δ with the output's channels)

s is the strength set by restuning.set_scale; 0 skips the bypass. The time embedding e the
blocks read (the input of the first tap) is captured too, for the ablation's FiLM option.

Memory by design: while any bypass is active in a call, the backbone up to the injection point
runs with grad disabled (the effect of `torch.no_grad()`, not inference mode: the tapped features
must stay usable by autograd as inputs of the bypass), and the taps are detached. Grad is switched
back on at the injection point, so autograd records the bypass and what follows the injection:
the head at depth 0; at depth k also the last k up blocks' activations (their weights stay
frozen, so no weight gradients and no optimiser state). If anything upstream does need grad (an
input that requires grad, a trainable parameter of the backbone such as a Res-Tuner attached
beside the bypass), the backbone runs with grad as usual: the result stays correct and only the
saving is lost.

At depth k, `gradient` chooses what training records after the injection (values are exact in
every mode; only the gradient differs):

    'exact'           the blocks as they are
    'skip-attention'  their attention blocks run without autograd; their Jacobian is taken as the
                      identity (a transformer block is x + f(x): the gradient of x alone)
    'skip-path'       nothing after the injection is recorded; the head receives
                      S(Δ) − S(Δ).detach(), S the blocks' linear skip path (skip_path), so the
                      gradient reaching Δ is Sᵀ of the head's

Everything is done with hooks, so an ordinary `unet(sample, t, text)` call or `pipe(...)` runs
the bypass. One set of hooks per U-Net serves every attached bypass. What one call captures
lives in a context variable created by that call, never in a module, so concurrent calls on one
U-Net (threads of a web server) do not see each other's features.

Several bypasses, one backbone forward:
- `restuning.route(names)`: batch sample i goes through the bypass names[i] (None: the base),
  the same routing the Res-Tuners use; the backbone runs once for the whole batch.
- `bypass_outputs(unet, names, sample, t, text)`: every bypass in `names` reads the same
  backbone features; returns one output per name (the multi-task inference of Section 3.2).

Other prompts on the same features (the trainer's off-concept loss, BypassConfig.off_concept_loss):
inside `off_concept(off, on)`, each text-reading bypass also computes its correction from the
features its U-Net call captured with other text in place of the prompt, and the yielded list
receives, relative to the injection point's input x_L,

    E_off = mean(Δ(off)²) / mean(x_L²)                    off: one prompt per batch row, none naming the concept
    E_on  = mean((Δ(on) − sg[Δ])²) / mean(x_L²)           on: a prompt for each of the first rows (the instance
                                                          images), naming the concept among other words

(sg: no gradient). The trainer adds their weighted mean to the loss: the correction is zero for
prompts without the concept's identifier and the same with it, whatever words surround it. Only
the bypass network runs again, not the backbone.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core import AttachError, Attached, routing_of
from .layer import BypassNetwork

_RUNNER = "_restuning_bypass_runner"
_HOLDER = "restuning_bypass"  # the ModuleDict on the U-Net that holds the networks, so they move with it


@dataclass
class _Bypass:
    handle: Attached
    network: BypassNetwork
    paths: list[str]
    inject: str
    gradient: str = "exact"  # BypassConfig.gradient
    rendered: int = 0  # index of the first up block after the injection point (len(up_blocks) at the head)


@dataclass
class _Call:
    """What one U-Net call captures for its bypasses."""

    grad: bool
    active: list[str]
    fanout: tuple | None
    text: Tensor | None = None
    temb: Tensor | None = None
    expanded: tuple | None = None  # fan-out below the head: (the block it began at, batch, copies)
    inputs: dict[str, Tensor] = field(default_factory=dict)
    outputs: dict[str, Tensor] = field(default_factory=dict)
    token: contextvars.Token | None = None
    light: bool = False  # attention after the injection runs without autograd, its gradient the identity
    pending: list = field(default_factory=list)  # (name, Δ with grad, rows) awaiting the head (straight-through)


_call: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("restuning_bypass_call", default=None)
# Set by off_concept: (prompts without the concept, one per batch row; prompts naming it, one per
# first row, or None; the list of energies).
_off: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("restuning_bypass_off_concept", default=None)
# Set by bypass_outputs around its one U-Net call: (the runner it is meant for, the names).
_fanout: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("restuning_bypass_fanout", default=None)


def tap_paths(unet: nn.Module, taps, depth: int = 0) -> list[str]:
    """Module paths of the tapped blocks, in forward order: those before the injection point."""
    n = len(unet.up_blocks)
    if depth > n:
        raise AttachError(f"bypass depth {depth}: this U-Net has only {n} up blocks")
    if "up" not in taps and 0 < depth < n:
        raise AttachError(f"bypass depth {depth} with taps {list(taps)}: the correction enters up_blocks.{n - depth}, whose input "
                          f"is the untapped output of up_blocks.{n - depth - 1}; tap 'up' too, or use depth {n} (this U-Net's "
                          "first up block)")
    paths = []
    if "mid" in taps and getattr(unet, "mid_block", None) is not None:
        paths.append("mid_block")
    if "up" in taps:
        paths += [f"up_blocks.{i}" for i in range(n - depth)]
    if not paths:
        raise AttachError("the U-Net has no mid or up blocks to tap before the injection point")
    return paths


OUTPUT = "<output>"  # the injection point "the U-Net's output" (no module's input)


def injection_path(unet: nn.Module, depth: int, at_output: bool = False) -> str:
    """The module whose input the bypass corrects: the head at depth 0, else up_blocks[-depth]."""
    if at_output:
        return OUTPUT
    if depth:
        return f"up_blocks.{len(unet.up_blocks) - depth}"
    return "conv_norm_out" if unet.conv_norm_out is not None else "conv_out"


def tap_channels(unet: nn.Module, paths: list[str]) -> list[int]:
    """Channels of x_0 and of each tap. In a UNet2DConditionModel the mid block keeps the
    deepest width and up block i outputs the i-th width from the deep end."""
    widths = list(unet.config.block_out_channels)
    out = {"mid_block": widths[-1], **{f"up_blocks.{i}": c for i, c in enumerate(reversed(widths))}}
    return [widths[-1]] + [out[p] for p in paths]


def text_channels(unet: nn.Module) -> int:
    width = unet.config.cross_attention_dim
    if not isinstance(width, int):
        raise AttachError(f"bypass text tuners need one cross-attention width; this U-Net has {width!r} (set text=false)")
    return width


def time_channels(unet: nn.Module) -> int:
    """Width of the time embedding the U-Net's blocks receive."""
    return unet.time_embedding.linear_2.out_features


def _hidden(args, kwargs) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args, kwargs, x: Tensor):
    if args:
        return (x, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": x}


def _repeat_batch(value, times: int, batch: int):
    """`value` with every tensor of `batch` rows repeated `times` over, as torch.cat of copies."""
    if isinstance(value, Tensor) and value.dim() and value.shape[0] == batch:
        return value.repeat(times, *[1] * (value.dim() - 1))
    if isinstance(value, (tuple, list)):
        return type(value)(_repeat_batch(v, times, batch) for v in value)
    return value


class _Runner:
    """The hooks of one U-Net, shared by all its bypasses; re-registered when the set changes."""

    def __init__(self, unet: nn.Module):
        self.unet = unet
        self.bypasses: dict[str, _Bypass] = {}
        self.hooks: list = []
        self.own: set[int] = set()

    def add(self, name: str, bypass: _Bypass) -> None:
        self.bypasses[name] = bypass
        self._rehook()

    def remove(self, name: str) -> None:
        del self.bypasses[name]
        self._rehook()

    def _rehook(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
        self.own = {id(p) for b in self.bypasses.values() for p in b.network.parameters()}
        if not self.bypasses:
            return
        unet = self.unet
        firsts = {b.paths[0] for b in self.bypasses.values()}
        taps = {p for b in self.bypasses.values() for p in b.paths}
        injections = {b.inject for b in self.bypasses.values()}
        head = injection_path(unet, 0)
        straight = any(b.gradient == "skip-path" for b in self.bypasses.values())
        light = sorted({i for b in self.bypasses.values() if b.gradient == "skip-attention" for i in range(b.rendered, len(unet.up_blocks))})
        attentions = [m for i in light for m in (getattr(unet.up_blocks[i], "attentions", None) or [])]
        # Below an up-block injection, a fan-out's later up blocks need their skip connections,
        # time and text embeddings copied once per task as well.
        followers = [f"up_blocks.{i}" for i in range(len(unet.up_blocks))] if any(p.startswith("up_blocks.") for p in injections) else []
        self.hooks = [
            unet.register_forward_pre_hook(self._begin, with_kwargs=True),
            unet.register_forward_hook(self._end, with_kwargs=True, always_call=True),
            *(unet.get_submodule(p).register_forward_pre_hook(self._injector(p), with_kwargs=True)
              for p in sorted(injections) if p != OUTPUT),
            *(unet.get_submodule(p).register_forward_pre_hook(_follower(p), with_kwargs=True) for p in followers),
            *([unet.get_submodule(head).register_forward_pre_hook(self._straight_through, with_kwargs=True)] if straight else []),
            *(m.register_forward_pre_hook(_attention_off, with_kwargs=True) for m in attentions),
            *(m.register_forward_hook(_attention_identity, with_kwargs=True) for m in attentions),
            *(unet.get_submodule(p).register_forward_pre_hook(_capture_input(p), with_kwargs=True) for p in sorted(firsts)),
            *(unet.get_submodule(p).register_forward_hook(_capture_output(p)) for p in sorted(taps)),
        ]

    def _begin(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        fanout = _fanout.get()
        if fanout is not None and fanout[0] is self:
            names = fanout[1]
            active = [n for n in dict.fromkeys(names) if n is not None]
        else:
            names = None
            active = [n for n, b in self.bypasses.items() if b.handle.scale != 0 and _routed_in(n, sample)]
        call = _Call(grad=torch.is_grad_enabled(), active=active, fanout=names)
        if any(self.bypasses[n].network.uses_text for n in active):
            text = args[2] if len(args) > 2 else kwargs.get("encoder_hidden_states")
            call.text = None if text is None else text.detach()
        if (active or names is not None) and call.grad and not self._backbone_needs_grad(args, kwargs):
            torch.set_grad_enabled(False)
        call.token = _call.set(call)

    def _end(self, module, args, kwargs, output):
        call = _call.get()
        if call is None or call.token is None:
            return None
        try:
            torch.set_grad_enabled(call.grad)
            if OUTPUT not in {b.inject for b in self.bypasses.values()} or (not call.active and call.fanout is None):
                return None
            sample = output[0] if isinstance(output, tuple) else output.sample
            changed = self._inject(OUTPUT, call, sample, (), {"hidden_states": sample})
            if changed is None:
                return None
            sample = changed[1]["hidden_states"]
            return (sample, *output[1:]) if isinstance(output, tuple) else type(output)(sample=sample)
        finally:
            _call.reset(call.token)

    def _injector(self, path: str):
        def hook(module, args, kwargs):
            call = _call.get()
            if call is None or (not call.active and call.fanout is None):
                return None
            # Autograd resumes here for the blocks after the injection, unless every bypass entering
            # here is straight-through ('skip-path'); 'skip-attention' leaves their attention out.
            here = [n for n in call.active if self.bypasses[n].inject == path]
            recorded = [n for n in here if self.bypasses[n].gradient != "skip-path"]
            call.light = call.grad and any(self.bypasses[n].gradient == "skip-attention" for n in recorded)
            torch.set_grad_enabled(call.grad and (call.fanout is not None or bool(recorded) or not here))
            return self._inject(path, call, _hidden(args, kwargs), args, kwargs)

        return hook

    def _straight_through(self, module, args, kwargs):
        """At the head: each straight-through Δ's gradient path, S(Δ) − S(Δ).detach() (zero in value)."""
        call = _call.get()
        if call is None or not call.pending:
            return None
        torch.set_grad_enabled(call.grad)
        x = _hidden(args, kwargs)
        for name, delta, rows in call.pending:
            path = skip_path(self.unet, self.bypasses[name].rendered, delta, x.shape[-2:])
            term = (path - path.detach()).to(x.dtype)
            x = x + term if rows is None else x.index_add(0, rows, term)
        call.pending.clear()
        return _with_hidden(args, kwargs, x)

    def _inject(self, path: str, call: "_Call", x: Tensor, args, kwargs):
        if call.fanout is not None:
            if path != self._fanout_path(call.fanout):
                return None
            batch, times = x.shape[0], len(call.fanout)
            x = torch.cat([x if n is None else x + self._delta(n, call, x) for n in call.fanout])
            if times > 1 and path.startswith("up_blocks."):
                call.expanded = (path, batch, times)
                args, kwargs = _expand(args, kwargs, batch, times)
            return _with_hidden(args, kwargs, x)
        changed = False
        for name in call.active:
            if self.bypasses[name].inject != path:
                continue
            routing = routing_of(name, x.shape[0], x.device)
            if not routing.any:
                continue
            rows = None if routing.all else routing.rows
            straight = self.bypasses[name].gradient == "skip-path" and call.grad
            with torch.set_grad_enabled(call.grad):
                delta = self._delta(name, call, x, rows)
            if straight:
                call.pending.append((name, delta, rows))
                delta = delta.detach()
            x = x + delta if rows is None else x.index_add(0, rows, delta)
            changed = True
        return _with_hidden(args, kwargs, x) if changed else None

    def _fanout_path(self, names) -> str:
        paths = {self.bypasses[n].inject for n in names if n is not None}
        return paths.pop() if paths else injection_path(self.unet, 0)

    def _delta(self, name: str, call: _Call, x: Tensor, rows: Tensor | None = None) -> Tensor:
        bypass = self.bypasses[name]
        x0 = call.inputs[bypass.paths[0]]
        features = [call.outputs[p] for p in bypass.paths]
        text = call.text if bypass.network.uses_text else None
        temb = call.temb if bypass.network.uses_time else None
        if rows is not None:
            x0, features = x0[rows], [f[rows] for f in features]
            text = None if text is None else text[rows]
            temb = None if temb is None else temb[rows]
        delta = bypass.network(x0, features, text, temb)
        off = _off.get()
        if off is not None and text is not None and call.grad and rows is None:
            self._other_prompts(bypass.network, x0, features, temb, x.detach().float(), delta, *off)
        if bypass.handle.scale != 1:
            delta = delta * bypass.handle.scale
        return delta.to(x.dtype)

    @staticmethod
    def _other_prompts(network, x0, features, temb, x, delta, off, on, energies) -> None:
        """E_off and E_on (module docstring) of one bypass in one call."""
        energies.append(network(x0, features, off.to(x0.device).detach(), temb).float().pow(2).mean() / x.pow(2).mean().clamp_min(1e-12))
        if on is not None:
            n = on.shape[0]
            same = network(x0[:n], [f[:n] for f in features], on.to(x0.device).detach(), None if temb is None else temb[:n])
            energies.append((same.float() - delta[:n].detach().float()).pow(2).mean() / x[:n].pow(2).mean().clamp_min(1e-12))

    def _backbone_needs_grad(self, args, kwargs) -> bool:
        values = [*args, *kwargs.values()]
        values += [v for d in values if isinstance(d, dict) for v in d.values()]
        if any(isinstance(v, Tensor) and v.requires_grad for v in values):
            return True
        return any(p.requires_grad and id(p) not in self.own for p in self.unet.parameters())


def _attention_off(module, args, kwargs):
    call = _call.get()
    if call is not None and call.light and torch.is_grad_enabled():
        module._restuning_input = _hidden(args, kwargs)
        torch.set_grad_enabled(False)


def _attention_identity(module, args, kwargs, output):
    x = module.__dict__.pop("_restuning_input", None)
    if x is None:
        return None
    torch.set_grad_enabled(True)
    sample = output[0] if isinstance(output, tuple) else output.sample
    sample = sample + (x - x.detach())
    return (sample, *output[1:]) if isinstance(output, tuple) else type(output)(sample=sample)


def skip_path(unet: nn.Module, first: int, h: Tensor, size) -> Tensor:
    """S(h): h carried from the input of up_blocks[first] to the head's input along the frozen
    blocks' linear skip path: each resnet's shortcut (its 1x1 conv's columns for the hidden
    channels, which come first in cat([hidden, skip])) over its output scale, attention as the
    identity (its residual), each upsampler as it is. A linear map; the gradient a
    straight-through Bypass gets in place of the true Jacobian of those blocks."""
    for block in unet.up_blocks[first:]:
        for resnet in block.resnets:
            if resnet.conv_shortcut is not None:
                weight = resnet.conv_shortcut.weight
                h = F.conv2d(h.to(weight.dtype), weight[:, : h.shape[1]])
            h = h / resnet.output_scale_factor
        for upsampler in block.upsamplers or []:
            h = _linear_upsample(upsampler, h)
    if h.shape[-2:] != tuple(size):
        h = F.interpolate(h, size=tuple(size), mode="nearest")
    return h


def _linear_upsample(upsampler: nn.Module, h: Tensor) -> Tensor:
    """diffusers' Upsample2D without its conv's bias (S is linear): nearest x2, then its conv."""
    if getattr(upsampler, "norm", None) is not None:
        raise AttachError("skip-path: an upsampler with a norm is not linear")
    conv = getattr(upsampler, "conv", None)
    if getattr(upsampler, "use_conv_transpose", False):
        return F.conv_transpose2d(h.to(conv.weight.dtype), conv.weight, stride=conv.stride, padding=conv.padding)
    h = F.interpolate(h, scale_factor=2.0, mode="nearest")
    if getattr(upsampler, "use_conv", False):
        h = F.conv2d(h.to(conv.weight.dtype), conv.weight, padding=conv.padding)
    return h


def _expand(args, kwargs, batch: int, times: int):
    return _repeat_batch(args, times, batch), {k: _repeat_batch(v, times, batch) for k, v in kwargs.items()}


def _follower(path: str):
    def hook(module, args, kwargs):
        call = _call.get()
        if call is None or call.expanded is None or call.expanded[0] == path:
            return None
        return _expand(args, kwargs, *call.expanded[1:])

    return hook


def _routed_in(name: str, sample: Tensor) -> bool:
    return routing_of(name, sample.shape[0], sample.device).any


def _capture_input(path: str):
    def hook(module, args, kwargs):
        call = _call.get()
        if call is not None and (call.active or call.fanout is not None):
            call.inputs[path] = _hidden(args, kwargs).detach()
            temb = args[1] if len(args) > 1 else kwargs.get("temb")
            if call.temb is None and isinstance(temb, Tensor):
                call.temb = temb.detach()

    return hook


def _capture_output(path: str):
    def hook(module, args, output):
        call = _call.get()
        if call is not None and (call.active or call.fanout is not None):
            call.outputs[path] = output.detach()

    return hook


def attach(unet: nn.Module, config, name: str) -> Attached:
    paths = tap_paths(unet, config.taps, config.depth)
    device = next(unet.parameters()).device
    network = BypassNetwork(tap_channels(unet, paths), config.horizontal, config.vertical, config.dim, config.heads,
                            output=config.output, text_channels=text_channels(unet) if config.text else None,
                            out_channels=unet.config.out_channels if config.into == "noise" else None,
                            time=config.time, time_channels=time_channels(unet), refine=config.refine,
                            readouts=config.readouts, trigger=config.trigger).to(device)
    if not hasattr(unet, _HOLDER):
        setattr(unet, _HOLDER, nn.ModuleDict())
    getattr(unet, _HOLDER)[name] = network
    handle = Attached(name=name, config=config, modules={"bypass": network})
    if _RUNNER not in unet.__dict__:
        unet.__dict__[_RUNNER] = _Runner(unet)
    runner = unet.__dict__[_RUNNER]
    runner.add(name, _Bypass(handle, network, paths, injection_path(unet, config.depth, config.into == "noise"), config.gradient,
                             len(unet.up_blocks) - config.depth))

    def undo():
        runner.remove(name)
        holder = getattr(unet, _HOLDER)
        del holder[name]
        if len(holder) == 0:
            delattr(unet, _HOLDER)
            del unet.__dict__[_RUNNER]

    handle.undo.append(undo)
    return handle


@contextlib.contextmanager
def off_concept(off: Tensor, on: Tensor | None = None):
    """Within: every text-reading bypass, in each U-Net call made with grad, also computes its
    correction with `off` (batch, tokens, width: prompts that do not name the concept) and with
    `on` (n, tokens, width: prompts naming it, for the first n rows) in place of the call's
    prompts; the yielded list receives E_off and E_on (module docstring) per bypass and call."""
    energies: list[Tensor] = []
    token = _off.set((off, on, energies))
    try:
        yield energies
    finally:
        _off.reset(token)


def bypass_outputs(unet: nn.Module, names: list[str | None], sample: Tensor, timestep, encoder_hidden_states: Tensor, **kwargs) -> list[Tensor]:
    """Run the backbone once and return one U-Net output per name in `names`, each as if only
    that bypass were attached (None: the base model). Extra keyword arguments go to the U-Net.
    The bypasses named must share one injection depth (the batch fans out there).
    """
    runner = unet.__dict__.get(_RUNNER)
    if runner is None:
        raise AttachError("no bypass is attached to this U-Net")
    unknown = [n for n in names if n is not None and n not in runner.bypasses]
    if unknown or not names:
        raise AttachError(f"not attached bypasses: {unknown or 'none given'}; attached: {sorted(runner.bypasses)}")
    depths = {runner.bypasses[n].handle.config.depth for n in names if n is not None}
    if len(depths) > 1:
        raise AttachError(f"bypass_outputs needs bypasses of one depth; these have depths {sorted(depths)}")
    token = _fanout.set((runner, tuple(names)))
    try:
        out = unet(sample, timestep, encoder_hidden_states, return_dict=False, **kwargs)[0]
    finally:
        _fanout.reset(token)
    return list(out.split(sample.shape[0]))
