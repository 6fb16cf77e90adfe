"""Tiny random models built from configs (no network) and the composed Hydra config, shrunk for tests."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in its interpreter on CPU (set before any @triton.jit)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from shadowsparse.llm import LLMConfig, load_llm

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ["llama", "mistral", "opt"]


@pytest.fixture(scope="session", params=FAMILIES)
def tiny(request):
    """(model, tokenizer, family) for each registered family; frozen, eval mode, fp32."""
    model, tok = load_llm(LLMConfig(name=f"random:{request.param}", seed=0))
    return model, tok, request.param


def tiny_model(family: str = "llama", seed: int = 0):
    return load_llm(LLMConfig(name=f"random:{family}", seed=seed))[0]


@pytest.fixture
def ids():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (2, 24), generator=g)


def compose(*overrides: str):
    """The real train.yaml composed with overrides (as `python train.py ...` would), outside a Hydra run."""
    from hydra import compose as hcompose, initialize_config_dir

    import shadowsparse.schema  # noqa: F401  (types conf/ groups, as train.py does)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hcompose(config_name="train", overrides=list(overrides))
