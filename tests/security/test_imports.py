"""Crafted tuner files (issue 13, items 4 and 10): a header that lies about its tensors, or holds
JSON of the wrong type, is refused with a message before anything is attached for real; and
(issue 39, items 8 and 10) a LoRA's alpha that is not finite, and weights too large to render."""

import json
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import restuning
from restuning.io import MAX_WEIGHT, TunerFileError
from restuning.methods import METHODS
from trainers.service.uploads import UploadError, check_tuner_file, lora_as_tuner_file

SMALL = {"res-tuning": {"dim": 4}, "bypass": {"dim": 8}, "lora": {"rank": 2}, "adapter": {"dim": 4},
         "prefix": {"dim": 4}, "prompt": {"dim": 4}}


def saved(tmp_path, unet, config):
    restuning.attach(unet, config)
    path = tmp_path / f"{config.method}.safetensors"
    restuning.save(unet, path)
    restuning.detach(unet)
    return path


def rewritten(tmp_path, path, **header):
    """The same tensors under a header with some fields replaced (what an attacker can do)."""
    with safe_open(str(path), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    out = tmp_path / f"crafted-{len(list(tmp_path.iterdir()))}.safetensors"
    save_file(tensors, str(out), metadata={**metadata, **header})
    return out


@pytest.mark.parametrize("method", [m for m in METHODS if m in SMALL])
def test_a_genuine_tuner_of_every_method_passes_the_tensor_check(method, tmp_path, tiny_unet):
    config = restuning.config_from_dict({"method": method, **SMALL[method]})
    assert check_tuner_file(saved(tmp_path, tiny_unet, config), tiny_unet)[0] == config


def test_a_header_that_declares_a_huge_dim_is_refused_without_allocating_it(tmp_path, tiny_unet):
    path = saved(tmp_path, tiny_unet, restuning.ResTuningConfig(dim=4))
    config = json.loads(restuning.read_header(path)["config"])
    crafted = rewritten(tmp_path, path, config=json.dumps({**config, "dim": 3_000_000}))
    with pytest.raises(UploadError, match="tensors do not match its config.*3000000"):
        check_tuner_file(crafted, tiny_unet)
    extra = tmp_path / "extra.safetensors"
    with safe_open(str(path), framework="pt") as f:
        save_file({**{k: f.get_tensor(k) for k in f.keys()}, "more": torch.zeros(4)}, str(extra), metadata=f.metadata())
    with pytest.raises(UploadError, match="1 are not the config's"):
        check_tuner_file(extra, tiny_unet)


@pytest.mark.parametrize("header, message", [
    ({"base_arch": "[]"}, "base_arch does not describe a U-Net"),
    ({"base_arch": "{}"}, "base_arch does not describe a U-Net"),
    ({"base_arch": '"sd15"'}, "base_arch does not describe a U-Net"),
    ({"config": "[]"}, "config is not a JSON object"),
    ({"config": '"res-tuning"'}, "config is not a JSON object"),
    ({"config": '{"method": "res-tuning", "dim": "wide"}'}, "not usable|cannot be attached"),
])
def test_header_fields_of_the_wrong_type_get_a_message(header, message, tmp_path, tiny_unet):
    path = saved(tmp_path, tiny_unet, restuning.ResTuningConfig(dim=4))
    with pytest.raises(UploadError, match=message):
        check_tuner_file(rewritten(tmp_path, path, **header), tiny_unet)


def kohya_lora(path, layer: str, features: int, alpha: float, weight: float = 0.0):
    """A kohya LoRA of rank 2 on one U-Net layer (kohya's underscored name)."""
    save_file({f"lora_unet_{layer}.lora_down.weight": torch.full((2, features), weight),
               f"lora_unet_{layer}.lora_up.weight": torch.zeros(features, 2), f"lora_unet_{layer}.alpha": torch.tensor(alpha)},
              str(path))
    return path


TINY_LAYER = "mid_block_attentions_0_transformer_blocks_0_attn1_to_q"  # 64 features in the tiny U-Net


@pytest.mark.parametrize("alpha", [float("inf"), float("-inf"), float("nan")])
def test_a_lora_whose_alpha_is_not_finite_is_refused_in_plain_words(alpha, tmp_path, tiny_unet):
    """Issue 39, item 8: an inf alpha was an OverflowError ("Something went wrong"), a NaN one a
    ValueError from diffusers' loader."""
    path = kohya_lora(tmp_path / "style.safetensors", TINY_LAYER, 64, alpha)
    with pytest.raises(UploadError, match=r"^style.safetensors: its alpha is (-?inf|nan), not a finite number"):
        lora_as_tuner_file(path, tiny_unet, None, workdir=tmp_path / "work")


@pytest.mark.parametrize("peft, message", [({"r": float("inf"), "lora_alpha": 4}, "OverflowError"),
                                           ({"r": 2, "lora_alpha": float("inf")}, "its alpha is inf, not a finite number")])
def test_a_diffusers_lora_whose_header_says_an_infinite_rank_or_alpha_is_refused(peft, message, tmp_path, tiny_unet):
    """The peft config diffusers writes into a LoRA's header is used as it is: JSON's Infinity too."""
    layer = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file({f"{layer}.lora_A.weight": torch.zeros(2, 64), f"{layer}.lora_B.weight": torch.zeros(64, 2)}, str(path),
              metadata={"lora_adapter_metadata": json.dumps({f"unet.{k}": v for k, v in peft.items()})})
    with pytest.raises(UploadError, match=f"^pytorch_lora_weights.safetensors: .*{message}"):
        lora_as_tuner_file(path, tiny_unet, None, workdir=tmp_path / "work")


def test_a_lora_for_another_model_is_told_so_before_its_alpha_is_read(tmp_path, tiny_unet):
    """Issue 39, item 8: its layers are not in this model, and its alpha is inf besides."""
    path = kohya_lora(tmp_path / "sdxl-style.safetensors", "input_blocks_4_1_transformer_blocks_0_attn1_to_q", 640,
                      float("inf"))
    with pytest.raises(UploadError, match="sdxl-style.safetensors was made for another model"):
        lora_as_tuner_file(path, tiny_unet, None, workdir=tmp_path / "work")


def test_the_runs_tab_refuses_such_a_lora_with_its_reason_and_deletes_the_upload(tmp_path, monkeypatch):
    """The Runs tab's import, as a visitor's click runs it: the message is the reason, not
    "Something went wrong (OverflowError)", and the upload is gone from the upload folder."""
    import gradio as gr

    from tests.test_jobs import make_runner
    from webui import runs_tab
    from webui.model import describe

    runner = make_runner(tmp_path / "runs")
    with gr.Blocks() as demo, gr.Tab("Runs") as tab:
        runs_tab.build(runner, describe(None), tab, gr.State(None))
    try_import = next(f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "try_import")
    uploads = tmp_path / "uploads"
    monkeypatch.setattr(runs_tab, "get_upload_folder", lambda: str(uploads))
    warnings = []
    monkeypatch.setattr(gr, "Warning", lambda message, *a, **k: warnings.append(message))
    demo_layer = "mid_block_attentions_0_transformer_blocks_0_attn1_to_q"  # 128 features in the demo model
    for name, layer, features, reason in [("inf-alpha.safetensors", demo_layer, 128, "its alpha is inf, not a finite number"),
                                          ("other-model.safetensors", "input_blocks_4_1_transformer_blocks_0_attn1_to_q", 640,
                                           "was made for another model")]:
        (uploads / name).parent.mkdir(parents=True, exist_ok=True)
        upload = kohya_lora(uploads / name, layer, features, float("inf"))
        assert try_import(str(upload), "", None)[2] is None, "the box is cleared"
        assert warnings[-1].startswith(name) and reason in warnings[-1], warnings[-1]
        assert not upload.exists(), "the refused upload is deleted"
    assert runner.run_ids() == []


def with_weight(tmp_path, path, value, dtype=torch.float32):
    """The tuner file with its first weight set to `value` (in `dtype`)."""
    with safe_open(str(path), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k).to(dtype) for k in f.keys()}, f.metadata()
    first = next(iter(tensors))
    tensors[first].view(-1)[0] = value
    out = tmp_path / f"weight-{len(list(tmp_path.iterdir()))}.safetensors"
    save_file(tensors, str(out), metadata=metadata)
    return out


ABOVE = float(np.nextafter(np.float32(MAX_WEIGHT), np.float32(np.inf)))  # the next float32 past fp16's largest number


@pytest.mark.parametrize("value, dtype, refused", [
    (1000.0, torch.float32, False), (MAX_WEIGHT, torch.float32, False), (-MAX_WEIGHT, torch.float32, False),
    (MAX_WEIGHT, torch.float16, False), (ABOVE, torch.float32, True), (-ABOVE, torch.float32, True),
    (65536.0, torch.bfloat16, True), (3e38, torch.float32, True), (1e300, torch.float64, True),
])
def test_weights_beyond_half_precision_are_refused(value, dtype, refused, tmp_path, tiny_unet):
    """Issue 39, item 10: 3e38 is finite, and renders black; the bound is fp16's largest number
    (restuning.io.MAX_WEIGHT), checked below, at and above it, for the studio and the library."""
    path = with_weight(tmp_path, saved(tmp_path, tiny_unet, restuning.LoraConfig(rank=2)), value, dtype)
    taken_or_refused(path, tiny_unet, refused, " holds 1 value\\(s\\) beyond ±65,504")


def taken_or_refused(path, unet, refused: bool, reason: str) -> None:
    """The studio's upload check and the library's load both take `path`, or both refuse it with
    `reason` (a pattern), attaching nothing."""
    if not refused:
        check_tuner_file(path, unet)
        restuning.load(unet, path, name="ok")
        restuning.detach(unet, "ok")
        return
    with pytest.raises(UploadError, match=f"^{path.name}: .*{reason}"):
        check_tuner_file(path, unet)
    with pytest.raises(TunerFileError, match=reason):
        restuning.load(unet, path, name="refused")
    assert "refused" not in restuning.attached(unet)


def test_a_lora_with_huge_weights_is_refused_naming_the_users_file(tmp_path, tiny_unet):
    """Issue 39, items 10 and 11: the refusal names the file the visitor chose, not the studio's
    converted copy of it."""
    path = kohya_lora(tmp_path / "my-style.safetensors", TINY_LAYER, 64, 2.0, weight=3e38)
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(UploadError) as refused:
        lora_as_tuner_file(path, tiny_unet, None, workdir=work)
    assert str(refused.value).startswith("my-style.safetensors: ") and "beyond ±65,504" in str(refused.value)
    assert "restuning" not in str(refused.value) and list(work.iterdir()) == []


def lora_with_update(tmp_path, tiny_unet, alpha: int, up: float, layout: str = "one"):
    """A restuning LoRA file (rank 2) whose only nonzero weights are in one layer's first row of B
    (up) and A's matching columns (1), so that its update's largest entry is alpha / 2 x up:
    "one": B[0, 0] meets A[0, 0]; "apart": B[0, 1] meets no nonzero A weight (B A is 0);
    "spread": B[0, 0] and B[0, 1] meet A[0, 0] and A[1, 1] (B's row norm is up x sqrt 2, above
    every entry of B A, so the check must form the product)."""
    path = saved(tmp_path, tiny_unet, restuning.LoraConfig(rank=2))
    with safe_open(str(path), framework="pt") as f:
        tensors, metadata = {k: torch.zeros_like(f.get_tensor(k)) for k in f.keys()}, dict(f.metadata())
    down_key = sorted(k for k in tensors if k.endswith("lora_A.weight"))[0]
    down, weights = tensors[down_key], tensors[down_key.replace("lora_A", "lora_B")]
    down[0, 0] = 1.0
    if layout == "spread":
        down[1, 1] = 1.0
        weights[0, :2] = up
    else:
        weights[0, 0 if layout == "one" else 1] = up
    config = json.loads(metadata["config"])
    out = tmp_path / f"lora-{len(list(tmp_path.iterdir()))}.safetensors"
    save_file(tensors, str(out), metadata={**metadata, "config": json.dumps({**config, "alpha": alpha})})
    return out


HALF = MAX_WEIGHT / 2  # 32,752: at alpha 4 / rank 2 its update is exactly the bound


ABOVE_HALF = float(np.nextafter(np.float32(HALF), np.float32(np.inf)))  # one float32 step above


@pytest.mark.parametrize("alpha, up, layout, refused", [
    (2, MAX_WEIGHT, "one", False),  # scale 1: the bound itself
    (4, HALF, "one", False),  # scale 2: exactly the bound
    (4, ABOVE_HALF, "one", True),
    (5, HALF, "one", True),
    (2, MAX_WEIGHT, "spread", False),  # the bound itself, where the norms' shortcut does not clear it
    (4, HALF, "spread", False),
    (4, ABOVE_HALF, "spread", True),
    (10**30, 1.0, "one", True),  # finite weights, finite alpha: renders black
    (10**30, 0.0, "one", False),  # an untrained (zero) up weight changes nothing at any alpha
    (10**30, 1.0, "apart", False),  # up and down weights of different ranks meet no nonzero partner: B A is 0
])
def test_a_lora_whose_update_is_beyond_half_precision_is_refused(alpha, up, layout, refused, tmp_path, tiny_unet):
    """Issue 39, item 10, for a LoRA's alpha: each weight may be small, but alpha / rank x B A is
    what the layer adds, and beyond ±65,504 it renders black; checked for the studio and the library."""
    path = lora_with_update(tmp_path, tiny_unet, alpha, up, layout)
    taken_or_refused(path, tiny_unet, refused, "its update of .* beyond ±65,504.*would turn images black")


def test_a_kohya_lora_with_a_huge_alpha_is_refused_naming_the_users_file(tmp_path, tiny_unet):
    """Its weights are small and finite, its alpha 1e30: refused before the converted copy is written."""
    path = tmp_path / "strong.safetensors"
    save_file({f"lora_unet_{TINY_LAYER}.lora_down.weight": torch.full((2, 64), 0.01),
               f"lora_unet_{TINY_LAYER}.lora_up.weight": torch.full((64, 2), 0.01),
               f"lora_unet_{TINY_LAYER}.alpha": torch.tensor(1e30)}, str(path))
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(UploadError, match=r"^strong.safetensors: its update of .*alpha 1e\+30 / rank 2.*beyond ±65,504"):
        lora_as_tuner_file(path, tiny_unet, None, workdir=work)
    assert list(work.iterdir()) == []


LARGEST_FLOAT = int(sys.float_info.max)  # 309 digits


@pytest.mark.parametrize("alpha, refused", [(LARGEST_FLOAT, False), (LARGEST_FLOAT + 1, True), (10**400, True)],
                         ids=["the largest float", "one above", "400 digits"])
def test_a_lora_alpha_beyond_any_float_is_refused_by_its_config(alpha, refused, tmp_path, tiny_unet):
    """peft divides alpha by the rank as a float (OverflowError beyond the largest float): a
    header's alpha may be at most that."""
    path = lora_with_update(tmp_path, tiny_unet, alpha, 0.0)
    if not refused:
        check_tuner_file(path, tiny_unet)
        return
    digits = len(str(alpha))
    with pytest.raises(UploadError, match=f"alpha must be a number a float holds; got a {digits}-digit number"):
        check_tuner_file(path, tiny_unet)
    with pytest.raises(TunerFileError, match="alpha must be a number a float holds"):
        restuning.load(tiny_unet, path, name="huge")
