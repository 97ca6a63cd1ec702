"""Contracts every method keeps, pinned where they act rather than by "differs from 0 and 1":

- strength s (restuning.set_scale), at the point where the correction enters. Res-Tuning:
  OP(x) + s·R(x) at each tuned OP (Eq. 7 with the tuner's output scaled). The bound baselines:
  their unbound form with strength s, from restuning.unbinding and the modules' own weights:
  Adapter FF(x) + s·A(FF(x)) (Eq. 6); Prefix and Prompt W_o((1 − sλ)·Attn(Q, K, V) + sλ·Attn(Q, K_extra,
  V_extra)) (Eq. 3 and 5, λ of Eq. 10 and 12) per head; LoRA W x + s·(α/r)·B A x at each adapted
  layer, of the U-Net and of the text encoder. Full fine-tuning has no strength and refuses one.
  (The Bypass's own contracts: tests/test_bypass.py.)
- the trainable-parameter count of each method at its defaults on SD v1.5, exact, from the
  architecture's facts written out here (restuning.count builds the U-Net on the meta device).
"""

from __future__ import annotations

import pytest
import torch

import restuning
from restuning.unbinding import unbound_attention

STRENGTHS = (0.0, 0.3, 0.7, 1.0)


def perturb(handle, seed=3, size=0.2):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in handle.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * size)


class Capture:
    """Every call of the modules at `paths`: (args, kwargs, output), the output as the U-Net saw it
    (a forward hook registered after the method's own runs after it)."""

    def __init__(self, model, paths):
        self.calls = {p: [] for p in paths}
        self.hooks = [model.get_submodule(p).register_forward_hook(self._hook(p), with_kwargs=True) for p in paths]

    def _hook(self, path):
        def hook(module, args, kwargs, output):
            self.calls[path].append((args, kwargs, output))

        return hook

    def remove(self):
        for h in self.hooks:
            h.remove()


def strengths_at(unet, handle, paths, inputs, expected_fn):
    """For each strength s, each captured call of each path: output == expected_fn(path, module, args, kwargs, s)."""
    for s in STRENGTHS:
        restuning.set_scale(unet, s)
        capture = Capture(unet, paths)
        with torch.no_grad():
            unet(*inputs)
        capture.remove()
        for path, calls in capture.calls.items():
            assert calls, f"{path} was not called"
            module = unet.get_submodule(path)
            for args, kwargs, output in calls:
                with torch.no_grad():
                    expected = expected_fn(path, module, args, kwargs, s)
                torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5,
                                           msg=lambda m, path=path, s=s: f"{path} at strength {s}: {m}")


@pytest.mark.parametrize("layout", [{"attn1": "adapter", "ff": "adapter"}, {"attn2": "prefix", "block": "prompt"}],
                         ids=["dual-adapter", "prefix+prompt"])
def test_res_tuning_strength_scales_the_tuners_residual(tiny_unet, unet_inputs, layout):
    handle = restuning.attach(tiny_unet, restuning.ResTuningConfig(tuners=layout, dim=4))
    perturb(handle)

    # a tuner's key names its OP's path; "block" is the transformer block itself
    tuners = {key.removesuffix(".block"): tuner for key, tuner in handle.modules.items()}

    def expected(path, module, args, kwargs, s):
        x = args[0] if args else kwargs["hidden_states"]
        return module.forward(*args, **kwargs) + s * tuners[path](x)  # forward(): the OP alone, without its hooks

    strengths_at(tiny_unet, handle, list(tuners), unet_inputs, expected)


def test_bound_adapter_strength_is_its_parallel_form(tiny_unet, unet_inputs):
    handle = restuning.attach(tiny_unet, restuning.AdapterConfig(ops=("attn1", "ff"), dim=4))
    perturb(handle)

    def expected(path, module, args, kwargs, s):
        ffn_out = module.forward(*args, **kwargs)
        return ffn_out + s * handle.modules[path](ffn_out)  # Eq. 6, the branch at strength s

    strengths_at(tiny_unet, handle, list(handle.modules), unet_inputs, expected)


def _heads(attn, t):
    b, n, c = t.shape
    return t.view(b, n, attn.heads, c // attn.heads).transpose(1, 2)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_bound_prefix_and_prompt_strength_is_their_unbound_form(tiny_unet, unet_inputs, method):
    config = (restuning.PrefixConfig if method == "prefix" else restuning.PromptConfig)(ops=("attn1", "attn2"), dim=3)
    handle = restuning.attach(tiny_unet, config)
    perturb(handle, size=0.5)

    def expected(path, attn, args, kwargs, s):
        hidden = args[0] if args else kwargs["hidden_states"]
        text = kwargs.get("encoder_hidden_states")
        context = hidden if path.endswith("attn1") else text
        q, k, v = (_heads(attn, f(x)) for f, x in ((attn.to_q, hidden), (attn.to_k, context), (attn.to_v, context)))
        tuner = handle.modules[path]
        if method == "prefix":
            k_extra, v_extra = (t.expand(q.shape[0], -1, -1, -1) for t in (tuner.key, tuner.value))
        else:
            tokens = tuner.tokens.expand(q.shape[0], -1, -1)
            k_extra, v_extra = _heads(attn, attn.to_k(tokens)), _heads(attn, attn.to_v(tokens))
        out = unbound_attention(q, k, v, k_extra, v_extra, attn.scale, strength=s)
        out = out.transpose(1, 2).flatten(2)
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor

    strengths_at(tiny_unet, handle, list(handle.modules), unet_inputs, expected)


def _lora_expected(name, alpha, rank):
    def expected(path, layer, args, kwargs, s):
        x = args[0]
        return layer.base_layer(x) + s * (alpha / rank) * layer.lora_B[name](layer.lora_A[name](x))

    return expected


def test_lora_strength_scales_the_low_rank_update_of_each_layer(unet_inputs):
    from tests.tiny_pipeline import tiny_pipeline

    pipe = tiny_pipeline()
    unet, text_encoder = pipe.unet.eval(), pipe.text_encoder
    rank, alpha = 2, 6  # α ≠ r: the update is scaled by α/r
    handle = restuning.attach(unet, restuning.LoraConfig(rank=rank, alpha=alpha, text_encoder="q_proj,out_proj"),
                              name="mine", text_encoder=text_encoder)
    perturb(handle)
    layers = [n for n, m in unet.named_modules() if n.endswith((".to_q", ".to_k", ".to_v", ".to_out.0")) and hasattr(m, "lora_A")]
    assert layers and all(n.startswith(("mid_block.", "up_blocks.")) for n in layers)
    strengths_at(unet, handle, layers, unet_inputs, _lora_expected("mine", alpha, rank))

    text_layers = [n for n, m in text_encoder.named_modules() if n.endswith(("q_proj", "out_proj")) and hasattr(m, "lora_A")]
    ids = torch.tensor([[0, 3, 4, 5, 1]])
    for s in STRENGTHS:
        restuning.set_scale(unet, s)
        capture = Capture(text_encoder, text_layers)
        with torch.no_grad():
            text_encoder(ids)
        capture.remove()
        for path, [(args, kwargs, output)] in capture.calls.items():
            with torch.no_grad():
                expected = _lora_expected("mine", alpha, rank)(path, text_encoder.get_submodule(path), args, kwargs, s)
            torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)


def test_full_fine_tuning_has_no_strength(tiny_unet):
    restuning.attach(tiny_unet, restuning.FullConfig())
    restuning.set_scale(tiny_unet, 1.0)
    with pytest.raises(restuning.AttachError, match="no strength"):
        restuning.set_scale(tiny_unet, 0.5)


# -- trainable parameters on SD v1.5 ------------------------------------------------------------------

# SD v1.5's transformer blocks in the parts the methods tune by default (mid and up): one in
# mid_block at 1280 channels, three in each of up_blocks.1-3 at 1280, 640 and 320 channels (the
# first up block has no attention). The text (cross-attention) width is 768.
MID_UP_WIDTHS = [1280] + [1280] * 3 + [640] * 3 + [320] * 3
DOWN_WIDTHS = [320, 320, 640, 640, 1280, 1280]  # 2 transformer blocks in each of the first three down blocks
TEXT = 768
# SD v1.5's ResNet blocks as (input, output) channels: down, mid, then up, whose inputs are the
# previous block's output concatenated with the skip connection's
RESNETS = ([(320, 320)] * 2 + [(320, 640), (640, 640), (640, 1280), (1280, 1280)] + [(1280, 1280)] * 2 + [(1280, 1280)] * 2
           + [(2560, 1280)] * 3 + [(2560, 1280), (2560, 1280), (1920, 1280)] + [(1920, 640), (1280, 640), (960, 640)]
           + [(960, 320), (640, 320), (640, 320)])


def _linear(n_in, n_out, bias=True):
    return n_in * n_out + (n_out if bias else 0)


def _adapter(c, length=10):
    return _linear(c, length) + _linear(length, c)  # W_down, b_down, W_up, b_up


def _convpass(n_in, n_out, width=16):
    return n_in * width + width + width * width * 9 + width + width * n_out + n_out  # 1x1 down, 3x3, 1x1 up


def _lora(n_in, n_out, rank=4):
    return rank * (n_in + n_out)  # A (rank x in), B (out x rank), no bias


EXPECTED_SD15 = {
    # Tri at 32: adapters beside attn1, ff and the block in every transformer block
    "res-tuning": sum(3 * _adapter(c, 32) for c in DOWN_WIDTHS + MID_UP_WIDTHS),
    "adapter": sum(_adapter(c) for c in MID_UP_WIDTHS),  # one after ff
    "prefix": sum(2 * 10 * c for c in MID_UP_WIDTHS),  # attn1: 10 keys and 10 values over all heads (heads x 10 x C/heads)
    "prompt": sum(10 * c for c in MID_UP_WIDTHS),  # attn1: 10 tokens of C channels
    # rank 4 on to_q, to_k, to_v, to_out.0 of attn1 (C -> C) and attn2 (to_k, to_v read the text)
    "lora": sum(4 * _lora(c, c) + 2 * _lora(c, c) + 2 * _lora(TEXT, c) for c in MID_UP_WIDTHS),
    "full": 859_520_964,  # every U-Net weight
}


def test_default_parameter_counts_on_sd15_are_exact():
    from restuning.count import count

    result = count("sd15")
    assert result["unet_params"] == 859_520_964
    found = {row["method"]: row["trainable"] for row in result["methods"]}
    assert {m: found[m] for m in EXPECTED_SD15} == EXPECTED_SD15
    assert EXPECTED_SD15["res-tuning"] == 2_435_136 and EXPECTED_SD15["lora"] == 509_440  # docs/library.md's table
    # the option of Convpass 16 beside every ResNet adds exactly these
    assert sum(_convpass(i, o) for i, o in RESNETS) == 3_305_408 - 2_435_136
    assert EXPECTED_SD15["res-tuning"] <= 0.01 * 859_520_964  # a parameter-efficient tuner: at most 1% of the U-Net
