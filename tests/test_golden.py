"""Golden tuner files (tests/golden/, written by `python -m scripts.golden`): for every method, a
file of each format version the library still reads, written by the library of that version, loads
through `restuning.load` and renders what that library rendered with it, at strength 1 and 0.5.
Files whose header is wrong are refused: a newer format version (saying to upgrade), a fingerprint
missing any field, a fingerprint of another U-Net."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import restuning
from restuning.io import FORMAT_VERSION
from restuning.methods import METHODS
from scripts import golden

FILES = sorted(p for p in golden.FOLDER.glob("*.safetensors") if not p.name.endswith(".expected.safetensors"))
# The fields a tuner file's fingerprint must hold, written out here rather than read from
# restuning.arch: each decides which weights fit which U-Net.
FINGERPRINT = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "transformer_layers_per_block",
               "cross_attention_dim", "attention_head_dim", "down_block_types", "mid_block_type", "up_block_types")


def close(got, expected, what):
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f"{what}: {m}")


def test_every_method_has_golden_files_of_every_version_it_reads():
    methods = {case["method"] for case in golden.CASES.values()}
    assert methods == set(METHODS)
    wanted = {golden.files(case, v)[0].name for case in golden.CASES for v in golden.versions(case)}
    have = {p.name for p in FILES}
    assert have == wanted, (f"missing: {sorted(wanted - have)}, stale: {sorted(have - wanted)}; run python -m scripts.golden "
                            "(--case NAME --force to rewrite one)")
    assert {int(p.stem.rsplit("-v", 1)[1]) for p in FILES} == set(range(1, FORMAT_VERSION + 1))
    assert any(case in golden.WITH_TEXT_ENCODER for case in golden.CASES)  # a tuner of the text encoder too


def _rewritten(path: Path, out: Path, **changes) -> Path:
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safe_open handle)
    save_file(tensors, str(out), metadata={**meta, **changes})
    return out


def _current(case: str = "res-tuning") -> Path:
    return golden.files(case, FORMAT_VERSION)[0]


def test_a_file_of_a_newer_format_version_is_refused_saying_to_upgrade(tmp_path):
    newer = _rewritten(_current(), tmp_path / "newer.safetensors", format_version=str(FORMAT_VERSION + 1))
    unet = golden.golden_unet()
    with pytest.raises(restuning.TunerFileError, match=f"format version {FORMAT_VERSION + 1} is newer .* upgrade restuning"):
        restuning.load(unet, newer)
    assert restuning.attached(unet) == {}


@pytest.mark.parametrize("field", FINGERPRINT)
def test_a_fingerprint_missing_any_field_is_refused(field, tmp_path):
    path = _current()
    fingerprint = json.loads(restuning.read_header(path)["base_arch"])
    assert field in fingerprint
    del fingerprint[field]
    short = _rewritten(path, tmp_path / "short.safetensors", base_arch=json.dumps(fingerprint))
    unet = golden.golden_unet()
    with pytest.raises(restuning.TunerFileError, match=rf"another U-Net architecture \({field}: file does not say"):
        restuning.load(unet, short)
    assert restuning.attached(unet) == {}


def test_a_file_for_another_text_width_is_refused():
    """A Res-Tuning file beside attn1 and ff has no weight whose shape depends on the text width:
    only the fingerprint tells the two U-Nets apart."""
    from diffusers import UNet2DConditionModel

    other = UNet2DConditionModel(**{**golden.GOLDEN_UNET_CONFIG, "cross_attention_dim": 24})
    with pytest.raises(restuning.TunerFileError, match=r"another U-Net architecture \(cross_attention_dim: file has 12, model has 24"):
        restuning.load(other, _current())
    assert restuning.attached(other) == {}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_a_golden_file_renders_as_the_library_that_wrote_it(path):
    case, version = path.stem.rsplit("-v", 1)
    expected = load_file(path.with_name(f"{path.stem}.expected.safetensors"))
    assert restuning.read_header(path)["format_version"] == version
    unet = golden.golden_unet()
    text_encoder = golden.golden_text_encoder() if case in golden.WITH_TEXT_ENCODER else None
    close(golden.outputs(unet, text_encoder), expected["base"], "the base model (scripts/golden.py builds it)")
    assert (expected["s1"] - expected["base"]).abs().max() > 0.01 * expected["base"].abs().max(), "the tuner changes nothing"

    handle = restuning.load(unet, path, text_encoder=text_encoder)
    stored = handle.config.to_dict()
    assert {k: stored[k] for k in golden.CASES[case]} == golden.CASES[case]
    close(golden.outputs(unet, text_encoder), expected["s1"], f"{path.name} at strength 1")
    if "s05" in expected:
        restuning.set_scale(unet, golden.STRENGTHS["s05"])
        close(golden.outputs(unet, text_encoder), expected["s05"], f"{path.name} at strength 0.5")
        restuning.detach(unet)
        close(golden.outputs(unet, text_encoder), expected["base"], f"{path.name} detached")
