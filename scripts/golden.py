"""Golden tuner files: for every method, a small tuner file on a tiny U-Net for each format version
the library still reads, written by the code of that version, beside the U-Net outputs that code
gave with it. tests/test_golden.py checks that `restuning.load` reproduces them today.

    python -m scripts.golden                        # write the files that are missing
    python -m scripts.golden --case bypass --force  # rewrite one case's files (after a deliberate change)
    python -m scripts.golden --list

Files go to tests/golden/: `<case>-v<version>.safetensors` (the tuner file as that version's
`restuning.save` wrote it) and `<case>-v<version>.expected.safetensors` (its outputs: `base`, the
U-Net without the tuner, and `s1`, `s05`, at strength 1 and 0.5; full fine-tuning only `s1`).

The files of the current format version are written by this checkout's library. Those of an older
version are written by that version's library, taken from git at the last commit that wrote it
(WRITERS), in a subprocess that imports it instead of this one: a golden file is what users'
files of that version are, not today's file with an older number in its header. When
FORMAT_VERSION is raised, add the last commit of the old version to WRITERS. A case's version is
written when the library of this checkout still reads it (`restuning.io.oldest_readable`).

The U-Net is GOLDEN_UNET_CONFIG with weights from an integer hash of each parameter's index
(`golden_weights`), not from torch's RNG or diffusers' initialisation, so the base model is the
same whichever torch or diffusers release builds it. The tuner's weights are those `attach` makes,
each moved by a hashed perturbation so that every one of them changes the output. This module
imports nothing from the project at module level: the subprocess imports it beside an older
`restuning`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "tests" / "golden"

# Smaller than restuning.arch's `tiny` (a full fine-tuning file holds every weight), with the same block types.
GOLDEN_UNET_CONFIG = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "cross_attention_dim": 12,
    "attention_head_dim": 2,
}

# A CLIP text encoder as small, its width the U-Net's cross-attention width.
GOLDEN_TEXT_CONFIG = {"vocab_size": 40, "hidden_size": 12, "intermediate_size": 24, "num_hidden_layers": 1,
                      "num_attention_heads": 2, "max_position_embeddings": 8}
GOLDEN_IDS = [[0, 5, 9, 17, 1], [0, 33, 2, 1, 1]]

# case -> the method config, as a tuner file's header holds it (fields each version's config has)
CASES = {
    "res-tuning": {"method": "res-tuning", "tuners": {"attn1": "adapter", "ff": "adapter"}, "blocks": ["mid", "up"], "dim": 4},
    "res-tuning-prompt": {"method": "res-tuning", "tuners": {"attn2": "prompt", "block": "adapter"}, "blocks": ["down", "mid", "up"],
                          "dim": 3, "heads": 2},
    "res-tuning-prefix": {"method": "res-tuning", "tuners": {"attn1": "prefix", "ff": "prefix"}, "blocks": ["mid", "up"], "dim": 3,
                          "heads": 2},
    "res-tuning-resnet": {"method": "res-tuning", "tuners": {"attn1": "adapter", "block": "adapter", "resnet": "adapter"},
                          "blocks": ["down", "mid", "up"], "dim": 4, "resnet_dim": 3, "identifier": ""},
    "bypass": {"method": "bypass"},
    "lora": {"method": "lora", "rank": 2, "alpha": 3, "blocks": ["down", "mid", "up"]},
    "lora-text-encoder": {"method": "lora", "rank": 2, "alpha": 4, "blocks": ["mid"], "text_encoder": "q_proj,out_proj"},
    "adapter": {"method": "adapter", "ops": ["attn1", "ff"], "blocks": ["mid", "up"], "dim": 4},
    "prefix": {"method": "prefix", "ops": ["attn1", "attn2"], "blocks": ["mid", "up"], "dim": 3},
    "prompt": {"method": "prompt", "ops": ["attn1", "attn2"], "blocks": ["mid", "up"], "dim": 3},
    "full": {"method": "full"},
}

# The first format version whose library has a case (LoRA of the text encoder came with version 2).
SINCE = {"lora-text-encoder": 2, "res-tuning-resnet": 4}
# Cases whose U-Net reads the golden text encoder's output (GOLDEN_TEXT_CONFIG) for GOLDEN_IDS.
WITH_TEXT_ENCODER = ("lora-text-encoder",)

# format version -> the last commit whose library wrote it
WRITERS = {
    1: "6bb601da2a19572b3566ac75655f76483e6daf5f",
    2: "8f8ea8f6882cdbb9bc651877e8347286696f6d2f",
    3: "0e8e01844096fb092ed5ff7ba186e614ef4931c9",
}

STRENGTHS = {"s1": 1.0, "s05": 0.5}


# -- what runs inside the writer (this checkout's library or an older one) ----------------------------


def _hashed(n: int, salt: int):
    """n numbers in [-1, 1) from an integer hash of (index, salt): exact integer arithmetic, the
    same on every machine and release."""
    import torch

    x = (torch.arange(n, dtype=torch.int64) * 2654435761 + salt * 40503 + 12345) % 2**31
    for _ in range(2):
        x = ((x ^ (x >> 13)) * 1103515245 + 12345) % 2**31
    return x.double() / 2**30 - 1


def golden_weights(module, salt: int = 0, size: float | None = None) -> None:
    """Every parameter of `module` from the hash, by its name's order: weights of fan-in f in
    ±1/√f, norm scales 1 ± 0.1, biases ± 0.1; with `size`, every parameter moved by ± size instead."""
    import torch

    with torch.no_grad():
        for i, (name, p) in enumerate(sorted(module.named_parameters())):
            u = _hashed(p.numel(), salt * 1000 + i).view(p.shape).to(p.dtype)
            if size is not None:
                p.add_(u * size)
            elif p.ndim >= 2:
                p.copy_(u * p[0].numel() ** -0.5)
            elif name.endswith("weight"):
                p.copy_(1 + 0.1 * u)
            else:
                p.copy_(0.1 * u)


def golden_unet():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**GOLDEN_UNET_CONFIG)
    golden_weights(unet)
    return unet.eval()


def golden_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    text_encoder = CLIPTextModel(CLIPTextConfig(**GOLDEN_TEXT_CONFIG))
    golden_weights(text_encoder, salt=2)
    return text_encoder.eval()


def golden_inputs():
    """(sample, timesteps, text embeddings) every golden output is computed for."""
    import torch

    sample = _hashed(2 * 4 * 8 * 8, 7).view(2, 4, 8, 8).float() * 1.5
    text = _hashed(2 * 5 * GOLDEN_UNET_CONFIG["cross_attention_dim"], 8).view(2, 5, -1).float()
    return sample, torch.tensor([20, 700]), text


def outputs(unet, text_encoder=None):
    """The U-Net's output for golden_inputs(); with `text_encoder`, conditioned on its output for GOLDEN_IDS."""
    import torch

    sample, timesteps, text = golden_inputs()
    with torch.no_grad():
        if text_encoder is not None:
            text = text_encoder(torch.tensor(GOLDEN_IDS))[0]
        return unet(sample, timesteps, text).sample


def write_case(case: str, tuner_path: str, expected_path: str) -> None:
    """Attach CASES[case] with the `restuning` this process imports, save it, and save its outputs."""
    import torch
    from safetensors.torch import save_file

    import restuning
    from restuning.methods import config_from_dict

    unet = golden_unet()
    text_encoder = golden_text_encoder() if case in WITH_TEXT_ENCODER else None
    expected = {"base": outputs(unet, text_encoder)}
    extra = {"text_encoder": text_encoder} if text_encoder is not None else {}
    handle = restuning.attach(unet, config_from_dict(dict(CASES[case])), **extra)
    if case == "full":  # every weight of the model moves
        golden_weights(unet, salt=1, size=0.05)
    else:
        for i, p in enumerate(handle.parameters()):
            with torch.no_grad():
                p.add_(_hashed(p.numel(), 5000 + i).view(p.shape).to(p.dtype) * 0.3)
    expected["s1"] = outputs(unet, text_encoder)
    if case != "full":
        restuning.set_scale(unet, STRENGTHS["s05"])
        expected["s05"] = outputs(unet, text_encoder)
        restuning.set_scale(unet, 1.0)
    restuning.save(unet, tuner_path)
    save_file({k: v.contiguous() for k, v in expected.items()}, expected_path, metadata={"case": case})


# -- the driver ---------------------------------------------------------------------------------------


def files(case: str, version: int) -> tuple[Path, Path]:
    return FOLDER / f"{case}-v{version}.safetensors", FOLDER / f"{case}-v{version}.expected.safetensors"


def versions(case: str) -> list[int]:
    """The format versions of `case` this checkout's library reads."""
    from restuning.io import FORMAT_VERSION, oldest_readable

    config = CASES[case]
    oldest, _ = oldest_readable(config["method"], config)
    return list(range(max(oldest, SINCE.get(case, 1)), FORMAT_VERSION + 1))


def _library_at(commit: str, dest: Path) -> Path:
    """The `restuning` package of `commit`, unpacked under `dest`."""
    archive = dest / "restuning.tar"
    with open(archive, "wb") as f:
        subprocess.run(["git", "-C", str(ROOT), "archive", commit, "restuning"], stdout=f, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    return dest


def write(case: str, version: int) -> None:
    from restuning.io import FORMAT_VERSION

    tuner, expected = files(case, version)
    FOLDER.mkdir(parents=True, exist_ok=True)
    if version == FORMAT_VERSION:
        write_case(case, str(tuner), str(expected))
        return
    if version not in WRITERS:
        raise SystemExit(f"{case} v{version}: no writer commit for format version {version}; add the last commit that wrote it to "
                         "scripts/golden.py's WRITERS")
    with tempfile.TemporaryDirectory(prefix="golden-") as tmp:
        library = _library_at(WRITERS[version], Path(tmp))
        # run as a file, not `-m scripts.golden`: the checkout's own restuning must not come first on sys.path
        env = {**os.environ, "PYTHONPATH": str(library)}
        subprocess.run([sys.executable, str(Path(__file__)), "--_write", case, str(tuner), str(expected)], env=env, check=True,
                       cwd=tmp)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", help=f"comma-separated cases (default: all): {', '.join(CASES)}")
    parser.add_argument("--force", action="store_true", help="rewrite the chosen cases' files, and delete those of versions no "
                                                             "longer read")
    parser.add_argument("--list", action="store_true", help="list the files and exit")
    parser.add_argument("--_write", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._write:
        write_case(*args._write)
        return 0
    chosen = [c.strip() for c in args.case.split(",")] if args.case else list(CASES)
    unknown = sorted(set(chosen) - set(CASES))
    if unknown:
        parser.error(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    for case in chosen:
        wanted = versions(case)
        if args.force:
            for old in FOLDER.glob(f"{case}-v*.safetensors"):
                old.unlink()
        for version in wanted:
            tuner, _ = files(case, version)
            if args.list:
                print(f"{tuner.relative_to(ROOT)} {'(present)' if tuner.exists() else '(missing)'}")
            elif not tuner.exists():
                write(case, version)
                print(f"wrote {tuner.relative_to(ROOT)} ({tuner.stat().st_size:,} bytes)", flush=True)
    return 0


if __name__ == "__main__":
    if "--_write" not in sys.argv:  # run as a file: the checkout's own library
        sys.path.insert(0, str(ROOT))
    sys.exit(main())
