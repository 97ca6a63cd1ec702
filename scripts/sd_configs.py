"""Writes assets/sd-configs/sd-v1/: the component configs and tokenizer files a single-file SD 1.x
checkpoint needs to load without the hub (`from_single_file(path, config=folder)`).

    python -m scripts.sd_configs                        # fetches open_clip_torch's wheel with pip for the BPE file
    python -m scripts.sd_configs --bpe bpe_simple_vocab_16e6.txt.gz

A single-file checkpoint carries weights only; diffusers takes the component configs and the
tokenizer from the hub. The configs are SD v1.5's (restuning.arch's U-Net); the tokenizer is
CLIP's BPE, which no package here ships in transformers' format: it is rebuilt from the merges
file OpenAI's CLIP (and open_clip, on PyPI) ship, the way their SimpleTokenizer builds it: the 256
byte symbols, the same with </w>, one token per merge, then the two special tokens (49408).
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "assets" / "sd-configs" / "sd-v1"
MERGES = 49152 - 256 - 2  # CLIP's vocabulary: 49408 = 2 x 256 bytes + 48894 merges + 2 specials


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, which CLIP's BPE uses."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tokenizer_files(bpe_gz: Path, folder: Path) -> None:
    merges = [tuple(line.split()) for line in gzip.open(bpe_gz).read().decode("utf-8").split("\n")[1:MERGES + 1]]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}, indent=2) + "\n")


def configs(folder: Path) -> None:
    from restuning.arch import SD15_UNET_CONFIG

    def write(path: str, data: dict) -> None:
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_text(json.dumps(data, indent=2) + "\n")

    write("model_index.json", {"_class_name": "StableDiffusionPipeline", "feature_extractor": [None, None],
                               "safety_checker": [None, None], "requires_safety_checker": False,
                               "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
                               "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
                               "vae": ["diffusers", "AutoencoderKL"]})
    write("scheduler/scheduler_config.json", {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                                              "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
                                              "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                                              "clip_sample": False, "prediction_type": "epsilon"})
    write("unet/config.json", {"_class_name": "UNet2DConditionModel", **SD15_UNET_CONFIG})
    write("vae/config.json", {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
                              "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
                              "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 2, "act_fn": "silu",
                              "norm_num_groups": 32, "sample_size": 512, "scaling_factor": 0.18215})
    write("text_encoder/config.json", {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": 49408,
                                       "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                                       "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                                       "projection_dim": 768, "layer_norm_eps": 1e-5, "pad_token_id": 1, "bos_token_id": 0,
                                       "eos_token_id": 2})


def fetch_bpe(work: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(work), "open_clip_torch"], check=True)
    wheel = next(work.glob("open_clip_torch-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        return Path(z.extract("open_clip/bpe_simple_vocab_16e6.txt.gz", work))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bpe", type=Path, help="CLIP's bpe_simple_vocab_16e6.txt.gz (default: from open_clip_torch's wheel)")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        bpe = args.bpe or fetch_bpe(Path(work))
        tokenizer_files(bpe, args.out / "tokenizer")
    configs(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
