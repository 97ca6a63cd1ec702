"""Hardware presets: the five options that decide whether a run fits in memory, chosen
automatically from the detected device. Steps, learning rate and the rest do not depend on
the hardware and stay with the form."""

from __future__ import annotations

PRESET_KEYS = ("resolution", "train_batch_size", "mixed_precision", "gradient_checkpointing", "use_8bit_adam")

# "resolution" is a ceiling: a run trains at min(ceiling, the base model's own resolution), 64 px
# for the demo model, 512 for SD v1.5. On CPU fp16 has no fast kernels and SD v1.5 steps take
# seconds, so the CPU preset stays at 256 px in fp32; on GPUs memory decides: gradient
# checkpointing and 8-bit Adam buy room on 8 GB, a 24 GB card affords batch 2.
PRESETS = {
    "CPU demo": {"resolution": 256, "train_batch_size": 1, "mixed_precision": "no",
                 "gradient_checkpointing": False, "use_8bit_adam": False},
    "8 GB GPU": {"resolution": 1024, "train_batch_size": 1, "mixed_precision": "fp16",
                 "gradient_checkpointing": True, "use_8bit_adam": True},
    "16 GB GPU": {"resolution": 1024, "train_batch_size": 1, "mixed_precision": "fp16",
                  "gradient_checkpointing": False, "use_8bit_adam": True},
    "24 GB+ GPU": {"resolution": 1024, "train_batch_size": 2, "mixed_precision": "fp16",
                   "gradient_checkpointing": False, "use_8bit_adam": False},
}


# SDXL's U-Net is three times SD v1.5's (2.6B parameters, 10-deep transformer stacks; 5 GB of
# weights in half precision and 1.6 GB more for its two text encoders): below 24 GB only gradient
# checkpointing and 8-bit Adam leave room for its activations, and an 8 GB card trains at 512 px
# (diffusers' SDXL DreamBooth README: under 16 GB with these savers at 1024 px). SD 2.x is SD 1.x's
# size and shares the presets, at its own resolution.
FAMILY_PRESETS = {
    "sdxl": {"8 GB GPU": {"resolution": 512},
             "16 GB GPU": {"gradient_checkpointing": True},
             "24 GB+ GPU": {"train_batch_size": 1, "gradient_checkpointing": True}},
}


def preset_values(name: str, native: int, family: str = "sd1") -> dict:
    """The preset's options for a base model of `family` whose own resolution is `native`."""
    values = {**PRESETS[name], **FAMILY_PRESETS.get(family, {}).get(name, {})}
    values["resolution"] = min(values["resolution"], native)
    return values


def detect_preset() -> tuple[str, str]:
    """(preset name, what was detected) from the first CUDA device's memory."""
    import torch

    if not torch.cuda.is_available():
        return "CPU demo", "no CUDA GPU found: training runs on the CPU"
    props = torch.cuda.get_device_properties(0)
    gib = props.total_memory / 2**30
    name = "8 GB GPU" if gib < 12 else "16 GB GPU" if gib < 20 else "24 GB+ GPU"
    return name, f"{props.name}, {gib:.0f} GiB"
