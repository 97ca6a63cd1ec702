"""Writes assets/sd-configs/: the component configs and tokenizer files a single-file checkpoint of
each Stable Diffusion family needs to load without the hub (`from_single_file(path, config=folder)`):

    sd-v1/   SD v1.5 (StableDiffusionPipeline, CLIP ViT-L text encoder, PNDM, epsilon)
    sd-v2/   SD 2.1 at 768 px (OpenCLIP ViT-H text encoder, 1024 wide, 23 layers as diffusers keeps it;
             DDIM, v-prediction), what diffusers itself takes for an SD 2.x single file
    sd-xl/   SDXL base 1.0 (StableDiffusionXLPipeline: CLIP ViT-L and OpenCLIP ViT-bigG with projection;
             Euler, epsilon)

    python -m scripts.sd_configs                        # fetches open_clip_torch's wheel with pip for the BPE file
    python -m scripts.sd_configs --bpe bpe_simple_vocab_16e6.txt.gz

A single-file checkpoint carries weights only; diffusers takes the component configs and the
tokenizer from the hub. The configs are the published models' (the U-Nets are restuning.arch's,
whose parameter counts tests/test_families.py checks). Every tokenizer here is CLIP's BPE (SD 2.x
and SDXL's second encoder pad with "!" instead of the end-of-text token), which no package here
ships in transformers' format: it is rebuilt from the merges file OpenAI's CLIP (and open_clip, on
PyPI) ship, the way their SimpleTokenizer builds it: the 256 byte symbols, the same with </w>, one
token per merge, then the two special tokens (49408).
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
OUT = ROOT / "assets" / "sd-configs"
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


def tokenizer_files(bpe_gz: Path, folder: Path, pad: str = "<|endoftext|>") -> None:
    merges = [tuple(line.split()) for line in gzip.open(bpe_gz).read().decode("utf-8").split("\n")[1:MERGES + 1]]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": pad}, indent=2) + "\n")


def _writer(folder: Path):
    def write(path: str, data: dict) -> None:
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_text(json.dumps(data, indent=2) + "\n")

    return write


SD_VAE = {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
          "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
          "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 2, "act_fn": "silu", "norm_num_groups": 32,
          "sample_size": 512, "scaling_factor": 0.18215}
CLIP_L = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": 49408, "hidden_size": 768,
          "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
          "hidden_act": "quick_gelu", "projection_dim": 768, "layer_norm_eps": 1e-5, "pad_token_id": 1, "bos_token_id": 0,
          "eos_token_id": 2}
SD_INDEX = {"_class_name": "StableDiffusionPipeline", "feature_extractor": [None, None], "safety_checker": [None, None],
            "requires_safety_checker": False, "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]}
BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
         "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False}


def configs(folder: Path) -> None:
    """SD v1.5's configs."""
    from restuning.arch import SD15_UNET_CONFIG

    write = _writer(folder)
    write("model_index.json", {**SD_INDEX, "scheduler": ["diffusers", "PNDMScheduler"]})
    write("scheduler/scheduler_config.json", {"_class_name": "PNDMScheduler", **BETAS, "prediction_type": "epsilon"})
    write("unet/config.json", {"_class_name": "UNet2DConditionModel", **SD15_UNET_CONFIG})
    write("vae/config.json", SD_VAE)
    write("text_encoder/config.json", CLIP_L)


def configs_v2(folder: Path) -> None:
    """stabilityai/stable-diffusion-2-1's configs (768 px, v-prediction)."""
    from restuning.arch import SD2_UNET_CONFIG

    write = _writer(folder)
    write("model_index.json", {**SD_INDEX, "scheduler": ["diffusers", "DDIMScheduler"]})
    write("scheduler/scheduler_config.json", {"_class_name": "DDIMScheduler", **BETAS, "prediction_type": "v_prediction"})
    write("unet/config.json", {"_class_name": "UNet2DConditionModel", **SD2_UNET_CONFIG})
    write("vae/config.json", {**SD_VAE, "sample_size": 768})
    write("text_encoder/config.json", {**CLIP_L, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
                                       "num_attention_heads": 16, "hidden_act": "gelu", "projection_dim": 512})


def configs_xl(folder: Path) -> None:
    """stabilityai/stable-diffusion-xl-base-1.0's configs."""
    from restuning.arch import SDXL_UNET_CONFIG

    write = _writer(folder)
    write("model_index.json", {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
                               "feature_extractor": [None, None], "image_encoder": [None, None],
                               "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
                               "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                               "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
                               "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]})
    write("scheduler/scheduler_config.json", {"_class_name": "EulerDiscreteScheduler", **BETAS, "prediction_type": "epsilon",
                                              "interpolation_type": "linear", "timestep_spacing": "leading",
                                              "use_karras_sigmas": False, "sample_max_value": 1.0})
    write("unet/config.json", {"_class_name": "UNet2DConditionModel", **SDXL_UNET_CONFIG})
    write("vae/config.json", {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True})
    write("text_encoder/config.json", CLIP_L)
    write("text_encoder_2/config.json", {**CLIP_L, "architectures": ["CLIPTextModelWithProjection"], "hidden_size": 1280,
                                         "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
                                         "hidden_act": "gelu", "projection_dim": 1280})


# folder -> (its configs, its tokenizers and their pad tokens)
FOLDERS = {"sd-v1": (configs, {"tokenizer": "<|endoftext|>"}),
           "sd-v2": (configs_v2, {"tokenizer": "!"}),
           "sd-xl": (configs_xl, {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"})}


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
        for name, (write_configs, tokenizers) in FOLDERS.items():
            for sub, pad in tokenizers.items():
                tokenizer_files(bpe, args.out / name / sub, pad)
            write_configs(args.out / name)
            print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
