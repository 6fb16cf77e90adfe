"""Positions as transformers 5 computes them (so the engine's logits match the model's); the norms and their torch
fallbacks live in kernels/rope_norm.py. RoPE (default type): inverse frequencies
theta^(-2i/D) in fp32, angles pos * inv_freq, cos/sin of [angles, angles] cast to the activations' dtype, applied
as q·cos + rotate_half(q)·sin. OPT: learned positions indexed at pos + 2 (its historic offset). The decode step
runs the fused Triton twins of RMSNorm and RoPE (kernels/rope_norm.py), tested against these.
"""
from __future__ import annotations

import torch

OPT_POSITION_OFFSET = 2



def rope_inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """(D/2,) fp32 inverse frequencies of the default RoPE."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=device) / head_dim))


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """positions (T,) int -> cos, sin (T, D) in dtype."""
    freqs = positions[:, None].float() * inv_freq[None, :]  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D); cos/sin (T, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
