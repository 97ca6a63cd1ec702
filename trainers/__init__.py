"""The training recipe (`python -m trainers.dreambooth`), side-by-side sampling, and in
trainers.service the run service that runs runs. Never imports gradio."""

import logging

# Library lines that say nothing a user can act on, dropped where they are logged (a filter on the
# library's own logger, so every other line of those loggers stays): this package is imported
# before diffusers by the studio and by the trainer, whose output is a run's Log box.
NOISE = {
    # diffusers imports bitsandbytes whenever it is installed; on a CPU with AVX-512 that then misses
    # an optional kernels package nothing here uses (its 8-bit AdamW runs without)
    "bitsandbytes.backends.cpu.ops": "pip install kernels",
    # loading a pipeline names its CLIP feature extractor; the PIL fallback is what the studio uses
    "transformers.utils.import_utils": "requires torchvision (not installed); falling back to",
    # `.to(dtype)` on a model with no module to keep in float32: an empty list, nothing inconsistent
    "diffusers.models.modeling_utils": "should be kept in float32: [].",
}
for _name, _phrase in NOISE.items():
    logging.getLogger(_name).addFilter(lambda record, phrase=_phrase: phrase not in record.getMessage())
