"""scripts.distinct_identifier: a copy of the demo model that differs in the identifier's embedding row only."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scripts.distinct_identifier import EMBEDDING, distinct_identifier, learned_identifier

MODEL = Path(__file__).resolve().parent.parent / "assets" / "demo-model"
WEIGHTS = Path("text_encoder") / "model.safetensors"


def test_only_the_identifiers_row_changes(tmp_path):
    out = tmp_path / "copy"
    found = distinct_identifier(MODEL, out, "sks", norm=0.5, seed=0)
    before, after = load_file(MODEL / WEIGHTS), load_file(out / WEIGHTS)
    assert before.keys() == after.keys()
    key = next(k for k in before if k.endswith(EMBEDDING))
    changed = (before[key] != after[key]).any(dim=1).nonzero().flatten().tolist()
    assert changed == [found["token_id"]]
    assert after[key][found["token_id"]].norm().item() == pytest.approx(0.5, rel=1e-5)
    assert found["norm_before"] == pytest.approx(before[key][found["token_id"]].norm().item())
    assert all(torch.equal(before[k], after[k]) for k in before if k != key)
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (MODEL / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()


def test_refuses_an_existing_folder_and_a_multi_token_identifier(tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError):
        distinct_identifier(MODEL, tmp_path / "taken")
    with pytest.raises(ValueError, match="tokens"):
        distinct_identifier(MODEL, tmp_path / "new", "sksqzx")
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_a_learned_row_is_the_only_change_and_lowers_the_loss_on_the_concept(tmp_path):
    out = tmp_path / "inverted"
    found = learned_identifier(MODEL, out, MODEL.parent / "concepts" / "heart", "sks", steps=40, lr=0.03, seed=0)
    before, after = load_file(MODEL / WEIGHTS), load_file(out / WEIGHTS)
    key = next(k for k in before if k.endswith(EMBEDDING))
    changed = (before[key] != after[key]).any(dim=1).nonzero().flatten().tolist()
    assert changed == [found["token_id"]]
    assert all(torch.equal(before[k], after[k]) for k in before if k != key)
    assert after[key][found["token_id"]].norm().item() == pytest.approx(found["norm_after"], rel=1e-5)
    assert found["norm_after"] != pytest.approx(found["norm_before"])
    assert found["loss_after"] < found["loss_before"]
