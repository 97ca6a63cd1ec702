"""restuning.identifier: the concept word's learned input-embedding rows (pivotal tuning) as part of
a Res-Tuning handle: exact identity at attach, only prompts with the word move, strength and
routing reach it, it round-trips through the file, and the text encoder stays the base model's."""

import pytest
import torch

import restuning
from tests.tiny_pipeline import tiny_pipeline

WITH, WITHOUT = "a photo of sks dog", "a photo of dog"


def encode(pipe, prompts):
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def moved(handle):
    with torch.no_grad():
        handle.modules["text_encoder.identifier"].delta.normal_(0, 0.5)


@pytest.fixture
def pipe():
    return tiny_pipeline()


def test_identity_at_attach_and_only_prompts_naming_the_word_move(pipe):
    base = encode(pipe, [WITH, WITHOUT])
    handle = restuning.attach(pipe, restuning.ResTuningConfig(tuners={"ff": "adapter"}, identifier="sks"))
    assert torch.equal(encode(pipe, [WITH, WITHOUT]), base)
    moved(handle)
    tuned = encode(pipe, [WITH, WITHOUT])
    assert not torch.equal(tuned[0], base[0]) and torch.equal(tuned[1], base[1])
    restuning.set_scale(pipe.unet, 0.0)
    assert torch.equal(encode(pipe, [WITH, WITHOUT]), base)
    restuning.set_scale(pipe.unet, 1.0)
    with restuning.route(["default", None]):  # the second row through the base model only
        routed = encode(pipe, [WITH, WITH])
    assert torch.equal(routed[0], tuned[0]) and torch.equal(routed[1], base[0])
    restuning.detach(pipe.unet)
    assert torch.equal(encode(pipe, [WITH, WITHOUT]), base)
    assert not hasattr(pipe.text_encoder.get_input_embeddings(), "restuners")


def test_the_rows_train_and_the_text_encoder_stays_frozen_and_out_of_its_state(pipe):
    keys = set(pipe.text_encoder.state_dict())
    handle = restuning.attach(pipe, restuning.ResTuningConfig(tuners={"ff": "adapter"}, identifier="sks"))
    delta = handle.modules["text_encoder.identifier"].delta
    assert delta.requires_grad and any(p is delta for p in handle.parameters())
    assert not any(p.requires_grad for p in pipe.text_encoder.parameters() if p is not delta)
    assert set(pipe.text_encoder.state_dict()) == keys  # a saved text encoder is the base model's
    assert delta.shape == (2, pipe.text_encoder.config.hidden_size)  # "s" and "k" in this tokenizer


def test_a_saved_identifier_loads_back_into_a_pipeline(pipe, tmp_path):
    handle = restuning.attach(pipe, restuning.ResTuningConfig(tuners={"ff": "adapter"}, identifier="sks"))
    moved(handle)
    tuned = encode(pipe, [WITH])
    path = restuning.save(pipe, tmp_path / "t.safetensors")
    restuning.detach(pipe.unet)
    fresh = tiny_pipeline()
    restuning.load(fresh, path)
    assert torch.equal(encode(fresh, [WITH]), tuned)
    assert restuning.read_config(path).identifier == "sks"


def test_special_tokens_are_never_the_identifier_s(pipe):
    """This tokenizer spells pieces it lacks as its end-of-text token, which pads every prompt."""
    from restuning.identifier import token_ids

    special = set(pipe.tokenizer.all_special_ids)
    assert special & set(pipe.tokenizer("sks", add_special_tokens=False).input_ids)  # the trap is there
    assert token_ids(pipe.tokenizer, "sks") == pipe.tokenizer.convert_tokens_to_ids(["s", "k"])
    with pytest.raises(restuning.AttachError, match="no tokens of its own"):
        restuning.attach(pipe, restuning.ResTuningConfig(identifier="<|endoftext|>"))
    assert restuning.attached(pipe.unet) == {}


def test_a_word_the_tokenizer_cannot_hold_or_a_missing_tokenizer_is_refused(pipe):
    with pytest.raises(restuning.AttachError, match="tokenizer"):
        restuning.attach(pipe.unet, restuning.ResTuningConfig(identifier="sks"), text_encoder=pipe.text_encoder)
    assert restuning.attached(pipe.unet) == {}
    with pytest.raises(restuning.ConfigError, match="one line"):
        restuning.attach(pipe, restuning.ResTuningConfig(identifier="sks\ndog"))
    with pytest.raises(restuning.ConfigError, match="at most 200"):
        restuning.attach(pipe, restuning.ResTuningConfig(identifier="s" * 201))
    restuning.attach(pipe, restuning.ResTuningConfig(identifier="s" * 200))  # at the limit


def test_auto_attaches_no_identifier_in_the_library(pipe):
    """'auto' is for the trainer, which makes it the instance prompt's concept word."""
    handle = restuning.attach(pipe, restuning.ResTuningConfig())
    assert not any(k.endswith("identifier") for k in handle.modules)
