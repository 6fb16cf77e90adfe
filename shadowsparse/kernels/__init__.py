"""Kernels that really skip work, each behind one function with a torch fallback (CPU, GPUs without Triton)."""
from .ffn import gated_ffn, gated_ffn_reference, gated_ffn_torch

__all__ = ["gated_ffn", "gated_ffn_reference", "gated_ffn_torch"]
