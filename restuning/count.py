"""Trainable parameters of every method at its default settings, beside the paper's Table 6.

    python -m restuning.count --arch sd15 [--json out.json]

The U-Net is built from its config on the meta device: parameter counts need shapes, not
weights, so this takes seconds and no memory.
"""

from __future__ import annotations

import argparse
import json

from .arch import ARCHS, build_unet
from .api import attach
from .core import attached, detach
from .methods import METHODS


def count(arch: str = "sd15") -> dict:
    unet = build_unet(arch, device="meta")
    total = sum(p.numel() for p in unet.parameters())
    rows = []
    for method in METHODS.values():
        config = method.config()
        handle = attach(unet, config)
        trainable = sum(p.numel() for p in handle.parameters())
        if method.name == "full":
            attached(unet).clear()  # full fine-tuning adds nothing to take off, and cannot detach
        else:
            detach(unet)
        rows.append({
            "method": method.name,
            "label": method.label,
            "trainable": trainable,
            "percent": 100.0 * trainable / total,
            "paper_m": method.paper_params_m,
            "config": config.to_dict(),
        })
    return {"arch": arch, "unet_params": total, "methods": rows}


def markdown(result: dict) -> str:
    lines = [
        f"U-Net `{result['arch']}`: {result['unet_params']:,} parameters.",
        "",
        "| method | trainable (ours) | % of U-Net | paper (Table 6) |",
        "|---|---:|---:|---:|",
    ]
    for r in result["methods"]:
        paper = f"{r['paper_m']:.2f}M" if r["paper_m"] is not None else "-"
        lines.append(f"| {r['label']} | {r['trainable']:,} ({r['trainable'] / 1e6:.2f}M) | {r['percent']:.3f}% | {paper} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sd15", choices=tuple(ARCHS), help="the U-Net (restuning.arch)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    result = count(args.arch)
    print(markdown(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
