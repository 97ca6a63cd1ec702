import os
import warnings

import pytest
import torch

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*xFormers.*")


@pytest.fixture
def tiny_unet():
    from restuning.arch import build_unet

    return build_unet("tiny", seed=0).eval()


@pytest.fixture
def unet_inputs():
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    timesteps = torch.tensor([10, 700])
    text = torch.randn(2, 7, 32, generator=g)
    return sample, timesteps, text


def run(unet, inputs):
    with torch.no_grad():
        return unet(*inputs).sample
