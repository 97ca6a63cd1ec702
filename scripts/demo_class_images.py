"""Make the class images the demo model ships (assets/demo-model/class-images/).

    python -m scripts.demo_class_images        # ~30 s on 2 cores

The studio's examples train with prior preservation on "a shape" at 64 px, seed 0: 100 images
the untouched base model makes the same way every time. Made once here, by the trainer's own
function (trainers.data.ensure_class_images) with the model's own sampling settings, and
recorded in class.json with the U-Net weights' digest, the trainer copies them into its cache
instead of making them again (trainers.data.shipped_class_images). Rebuilding the demo model
changes the digest, and the trainer then makes its own until this script is run again.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from trainers import data, models
from trainers.dreambooth import sampling_settings

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "assets" / "demo-model"
PROMPT, RESOLUTION, SEED, COUNT = "a shape", 64, 0, 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=COUNT)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    source = models.check_source(DEMO)
    pipe = models.load_pipeline(source, torch.float32)
    pipe.set_progress_bar_config(disable=True)
    sampling = sampling_settings(argparse.Namespace(num_inference_steps=None, guidance_scale=None), source)
    out = DEMO / data.SHIPPED_CLASS_IMAGES
    shutil.rmtree(out, ignore_errors=True)
    data.ensure_class_images(pipe, out, PROMPT, args.count, RESOLUTION, SEED, **sampling)
    made_as = {"prompt": PROMPT, "resolution": RESOLUTION, "seed": SEED, "precision": "float32", **sampling}
    (out / "class.json").write_text(json.dumps({**made_as, "count": args.count, "unet_sha256": data.weights_digest(DEMO),
                                                "made_by": "python -m scripts.demo_class_images"}, indent=1) + "\n")
    print(f"{args.count} class images in {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
