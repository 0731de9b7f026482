"""Shared tiny models for the conversion/checkpoint tests (kept small: 2 CPU cores)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=6, num_classes=5)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def tiny_hf_config(**overrides: object):  # type: ignore[no-untyped-def]
    from transformers import ViTConfig

    args: dict[str, object] = dict(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=6, intermediate_size=96,
        image_size=32, patch_size=8, num_labels=5,
    )
    args.update(overrides)
    return ViTConfig(**args)


def assert_training_steps_never_synchronise(module: torch.nn.Module, x: torch.Tensor) -> None:
    """Three forward + backward passes of ``module`` on CUDA with any GPU->CPU sync an error
    (after one warm-up pass, whose first-call allocations may sync)."""
    module(x).float().sum().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            module(x).float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def require_triton_interpreter() -> None:
    """Skip unless Triton's CPU interpreter can run the kernels: verified with triton 3.8
    (torch 2.14); with triton 3.6 and torch 2.11 (our GPU machine) torch.library's
    ``wrap_triton`` rejects interpreted kernels. The compiled kernels are tested on the GPU
    itself (tests/core/test_cuda.py)."""
    triton = pytest.importorskip("triton")
    version = tuple(int(part) for part in triton.__version__.split(".")[:2])
    if version < (3, 8):
        pytest.skip(f"Triton's interpreter is verified from triton 3.8; this is "
                    f"{triton.__version__}")
