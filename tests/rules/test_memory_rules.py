"""The memory estimate's rules (trainers.memory.estimate_parts and estimate), case by case: the
class-image phase (prior preservation generates its class images in batches of
--sample_batch_size before training: that batch is sampled like the validation images, and the
larger of the two counts), prior preservation doubling the training batch, gradient
checkpointing's factors, and the peak being the larger of the training step and sampling."""

import pytest

from trainers import memory, options
from trainers.memory import GIB, ModelFacts

FACTS = ModelFacts(unet_params=1000, vae_params=100, text_params=100, vae_scale=8, vae_channels=128, arch=1.0, unet_config={})


def parts(**kw):
    settings = dict(device="cpu", resolution=512, batch=1)
    settings.update(kw)
    return memory.estimate_parts(FACTS, 10, settings.pop("kind", "decoder"), **settings).parts


def sampled(images, resolution=512, half=False, device="cpu"):
    """The formula's sampling part for `images` images, written out."""
    latent = (resolution / 8) ** 2 / 1024
    k = memory.ACTIVATION_K[("cpu", "fp32")]["infer"] * (0.5 if half else 1) if device == "cpu" else \
        memory.ACTIVATION_K[("cuda", "half")]["infer"] * (1 if half else 2)
    decode = memory.VAE_DECODE_GIB[0] + memory.VAE_DECODE_GIB[1] * images * (resolution / 512) ** 2
    return int((k * 2 * images * latent + decode * (0.5 if half else 1)) * GIB)


@pytest.mark.parametrize("validation, class_batch, images", [
    (0, 0, 0), (4, 0, 4), (0, 4, 4), (2, 4, 4), (4, 2, 4), (3, 3, 3), (0, 1, 1), (1, 0, 1),
])
def test_sampling_is_the_larger_of_the_validation_images_and_the_class_image_batch(validation, class_batch, images):
    got = parts(validation_images=validation, class_batch=class_batch)["sampling"]
    assert got == (sampled(images) if images else 0)


@pytest.mark.parametrize("precision, device", [("no", "cpu"), ("bf16", "cpu"), ("fp16", "cuda"), ("no", "cuda")])
def test_sampling_follows_precision_and_device(precision, device):
    half = precision != "no"
    assert parts(class_batch=2, precision=precision, device=device)["sampling"] == sampled(2, half=half, device=device)


def test_the_u_net_step_alone_samples_nothing():
    assert parts(validation_images=4, class_batch=8, unet_only=True)["sampling"] == 0


@pytest.mark.parametrize("prior, rows", [(False, 1), (True, 2)])
@pytest.mark.parametrize("batch", [1, 3])
def test_prior_preservation_doubles_the_rows_of_the_training_step(prior, rows, batch):
    one = parts(batch=1)["activations"]
    assert parts(batch=batch, prior=prior)["activations"] == pytest.approx(one * batch * rows, abs=batch * rows)


@pytest.mark.parametrize("kind, rendered, factor", [("decoder", 0.0, memory.CHECKPOINTING), ("whole", 0.0, memory.CHECKPOINTING),
                                                    ("lora", 0.0, memory.CHECKPOINTING), ("beside", 0.0, 1.0),
                                                    ("beside", 0.3, memory.CHECKPOINTING_RENDERED)])
def test_gradient_checkpointing_shrinks_what_the_backward_keeps(kind, rendered, factor):
    plain = parts(kind=kind, rendered=rendered)["activations"]
    assert parts(kind=kind, rendered=rendered, checkpointing=True)["activations"] == pytest.approx(plain * factor, abs=1)


@pytest.mark.parametrize("class_batch", [0, 1, 64])
def test_the_peak_counts_the_larger_of_the_training_step_and_sampling(class_batch):
    est = memory.estimate_parts(FACTS, 10, "decoder", device="cpu", resolution=512, batch=1, class_batch=class_batch)
    p = est.parts
    assert est.total == int(p["overhead"] + p["weights"] + p["optimizer"] + max(p["grads"] + p["activations"], p["sampling"]))
    assert (p["sampling"] > p["grads"] + p["activations"]) == (class_batch == 64)


def demo(**values):
    return options.from_dict({"instance_data_dir": "instance", "instance_prompt": "a sks star", "output_dir": "out",
                              "method": "lora", "resolution": 64, **values})


@pytest.mark.parametrize("prior, sample_batch, validation, class_batch", [
    (False, 4, 0, 0),      # no prior preservation: no class images to make, whatever the batch
    (True, 4, 0, 4), (True, 1, 0, 1), (True, 16, 2, 16), (True, 1, 2, 1),
])
def test_the_estimate_reads_the_class_image_phase_from_the_options(monkeypatch, prior, sample_batch, validation, class_batch):
    # the model's facts and the method's count stand in (the rule is how the options reach the formula)
    monkeypatch.setattr(memory, "model_facts", lambda model: FACTS)
    monkeypatch.setattr(memory, "trainable_weights", lambda model, method, method_json: (10, "lora", 0.0))
    extra = {"validation_prompt": ["a sks star"], "num_validation_images": validation} if validation else {}
    est = memory.estimate(demo(with_prior_preservation=prior, class_prompt="a shape", sample_batch_size=sample_batch, **extra))
    expected = memory.estimate_parts(FACTS, 10, "lora", device="cpu", resolution=64, batch=1, prior=prior,
                                     validation_images=validation, class_batch=class_batch)
    assert est.parts == expected.parts and est.settings["prior"] == prior
