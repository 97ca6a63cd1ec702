"""Launched by tests/test_multiprocess.py under `accelerate launch --config_file ...`: prepares the
demo model's U-Net with its optimizer, takes one step, and prints what accelerate made of the
config on this machine: the process, accelerate's distributed type, the wrapper class, and how
many of the U-Net's parameters this process holds. Each process writes its report to
`<folder>/report-<rank>.json` (the folder is the one argument): two processes printing to one
pipe can interleave their lines."""

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import UNet2DConditionModel

accelerator = Accelerator()
unet = UNet2DConditionModel.from_pretrained(Path(__file__).resolve().parent.parent / "assets" / "demo-model", subfolder="unet")
total = sum(p.numel() for p in unet.parameters())
optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
model, optimizer = accelerator.prepare(unet, optimizer)
text = torch.randn(1, 7, unet.config.cross_attention_dim)
accelerator.backward(model(torch.randn(1, 4, 8, 8), torch.tensor([10]), text).sample.pow(2).mean())
optimizer.step()
report = {"rank": accelerator.process_index, "world": accelerator.num_processes,
          "distributed_type": str(accelerator.distributed_type).rsplit(".", 1)[-1], "wrapper": type(model).__name__,
          "held": sum(p.numel() for p in unet.parameters()), "total": total}
(Path(sys.argv[1]) / f"report-{accelerator.process_index}.json").write_text(json.dumps(report))
