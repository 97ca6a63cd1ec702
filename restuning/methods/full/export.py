"""Full fine-tuning's artefact: the trained U-Net as a diffusers `unet/` folder, which replaces a
pipeline's U-Net with `UNet2DConditionModel.from_pretrained(folder / "unet")`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

UNET_DIR = "unet"


def export(pipeline, handle, folder: Path) -> list[tuple[str, Path]]:
    folder = Path(folder)
    target = folder / UNET_DIR
    # Written beside the target and renamed, so a reader never sees a half-written folder.
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".unet-"))
    pipeline.unet.save_pretrained(tmp, safe_serialization=True)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return [("unet", target)]
