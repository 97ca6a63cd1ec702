"""A copy of a base model whose identifier token has a distinct input embedding.

    python -m scripts.distinct_identifier --out /tmp/demo-distinct [--base assets/demo-model] [--token sks]

The bundled demo model's text encoder never trained on "sks": its embedding row is still the
random initialisation, as small as a position embedding, so the token's hidden state is mostly its
place in the prompt (docs/bypass.md). SD v1.5's CLIP did train on "sks". This copy replaces that one
row with a random direction of a trained content word's norm (0.5: "circle" 0.47, "red" 0.56, the
untrained rows about 0.23), so benchmarks can ask what a method does when the identifier is
distinct, as on a real base model (`bench.quality --base OUT`). Nothing else in the copy changes.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
EMBEDDING = "embeddings.token_embedding.weight"


def distinct_identifier(base: Path, out: Path, token: str = "sks", norm: float = 0.5, seed: int = 0) -> dict:
    """Copy `base` to `out` (which must not exist) with `token`'s embedding row replaced; returns
    the token's id and the row's norm before and after."""
    from transformers import CLIPTokenizer

    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new folder")
    ids = CLIPTokenizer.from_pretrained(base / "tokenizer").encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"{token!r} is {len(ids)} tokens for this tokenizer; the identifier must be one")
    weights = Path("text_encoder") / "model.safetensors"
    state = load_file(base / weights)
    key = next((k for k in state if k.endswith(EMBEDDING)), None)
    if key is None:
        raise ValueError(f"{base / weights} has no {EMBEDDING}: not a CLIP text encoder")
    table = state[key]
    direction = torch.randn(table.shape[1], generator=torch.Generator().manual_seed(seed))
    before = float(table[ids[0]].norm())
    table[ids[0]] = (direction / direction.norm() * norm).to(table.dtype)
    shutil.copytree(base, out)
    save_file(state, out / weights, metadata={"format": "pt"})
    return {"token_id": ids[0], "norm_before": before, "norm_after": float(table[ids[0]].norm())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=REPO / "assets" / "demo-model")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--token", default="sks")
    parser.add_argument("--norm", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    found = distinct_identifier(args.base, args.out, args.token, args.norm, args.seed)
    print(f"{args.out}: {args.token!r} (id {found['token_id']}) embedding norm {found['norm_before']:.3f} -> {found['norm_after']:.3f}")


if __name__ == "__main__":
    main()
