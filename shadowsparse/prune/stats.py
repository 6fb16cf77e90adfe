"""Calibration statistics of one linear layer's input, accumulated by a forward pre-hook.

Every metric reads a subset: Wanda the channel norms ‖X_j‖₂, SparseGPT the Gram matrix XᵀX (its layer Hessian up to
a factor 2), E-Sparse the norms plus each channel's entropy, estimated from a bounded sample of rows.
"""
from __future__ import annotations

import torch


class InputStats:
    def __init__(self, in_features: int, gram: bool = False, sample_rows: int = 0, seed: int = 0):
        self.n = 0  # rows (tokens) seen
        self.sq_sum = torch.zeros(in_features, dtype=torch.float64)  # Σ_t x_tj²
        self.gram = torch.zeros(in_features, in_features, dtype=torch.float64) if gram else None  # Σ_t x_t x_tᵀ
        self.sample_rows = sample_rows  # rows kept for the entropy histograms (0: none)
        self.samples: list[torch.Tensor] = []
        self._kept = 0
        self._gen = torch.Generator().manual_seed(seed)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to("cpu", torch.float64)  # (N, I)
        self.n += x.shape[0]
        self.sq_sum += (x * x).sum(0)
        if self.gram is not None:
            self.gram += x.T @ x
        if self.sample_rows and self._kept < self.sample_rows:
            # an even spread over the calibration text: every batch contributes a random subset of its rows
            take = min(self.sample_rows - self._kept, x.shape[0])
            rows = torch.randperm(x.shape[0], generator=self._gen)[:take]
            self.samples.append(x[rows].float())
            self._kept += take

    @property
    def norm(self) -> torch.Tensor:
        """‖X_j‖₂ per input channel (I,)."""
        return self.sq_sum.sqrt().float()

    def hessian(self) -> torch.Tensor:
        """2 XᵀX / n: the Hessian of the layer's squared reconstruction error (I, I)."""
        if self.gram is None or self.n == 0:
            raise RuntimeError("no Gram matrix was accumulated for this layer")
        return (2.0 / self.n) * self.gram

    def sample(self) -> torch.Tensor:
        if not self.samples:
            raise RuntimeError("no activation rows were sampled for this layer")
        return torch.cat(self.samples)  # (N_s, I)

    def hook(self):
        def pre_hook(module, args):
            self.add(args[0])
        return pre_hook
