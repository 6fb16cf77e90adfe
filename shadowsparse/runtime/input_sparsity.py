"""Per-layer magnitude thresholds on the inputs of a layer's projections, for the decode engine: the engine path of
the selectors that decide by |x| > τ rather than by a top-k (kernels/sparse_input.py reads only the weight rows of
the kept input channels).

  teal       every projection input: attn_in (q/k/v), attn_out (o), ffn_in (gate/up, fc1), ffn_out (down, fc2)
  threshold  ffn_out only: the neurons whose |a| passes the layer's threshold (gate/up are read in full, the
             down rows of the dropped neurons are skipped)

The thresholds are the mask path's own (shadowsparse/teal.py, training_free.ThresholdScores), rounded to the
model's dtype: the hooks compare an fp16 |x| with the threshold cast to fp16, the kernel compares in fp32 the same
two values. The kernels count the kept (token, channel) pairs per layer and input on the device (``kept``, CUDA-graph
replays included), so the realized sparsity is measured on the tokens run, as the hooks count theirs.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError

INPUTS = ("attn_in", "attn_out", "ffn_in", "ffn_out")


class InputSparsity:
    """thresholds: (L, 4) fp32, column j the threshold of INPUTS[j] in each layer (layers before first_layer are
    not read); inputs: the names thresholded (the others run dense)."""

    def __init__(self, thresholds: torch.Tensor, inputs: tuple[str, ...], first_layer: int, label: str):
        unknown = [n for n in inputs if n not in INPUTS]
        if unknown or not inputs:
            raise ConfigError(f"input sparsity needs inputs from {INPUTS}, got {inputs!r}")
        if thresholds.dim() != 2 or thresholds.shape[1] != len(INPUTS):
            raise ConfigError(f"thresholds must be (layers, {len(INPUTS)}), got {tuple(thresholds.shape)}")
        self.thresholds = thresholds.float()
        self.inputs, self.first_layer, self.label = tuple(inputs), first_layer, label
        self.kept: torch.Tensor | None = None  # (L, 4) fp32 kept (token, channel) pairs, made by to()

    def on(self, name: str) -> bool:
        return name in self.inputs

    def to(self, device, dtype: torch.dtype) -> "InputSparsity":
        """The thresholds on ``device``, rounded to the model dtype (see the module docstring); a zeroed counter."""
        self.thresholds = self.thresholds.to(dtype).float().to(device)
        self.kept = torch.zeros_like(self.thresholds)
        return self

    def threshold(self, layer: int, name: str) -> torch.Tensor:
        """(1,) fp32 on the device: a view, so a captured graph reads the live value."""
        j = INPUTS.index(name)
        return self.thresholds[layer, j:j + 1]

    def counter(self, layer: int, name: str) -> torch.Tensor:
        j = INPUTS.index(name)
        return self.kept[layer, j:j + 1]

    def kept_per_input(self, first_layer: int) -> list[float]:
        """Kept (token, channel) pairs per INPUTS column, summed over the gated layers (a host copy)."""
        return self.kept[first_layer:].sum(0).tolist()

    def realized(self, kept: list[float], tokens: int, gated_layers: int, widths: dict[str, int]) -> dict:
        """Realized sparsity per thresholded input from kept_per_input() over ``tokens`` tokens."""
        if not tokens or gated_layers <= 0:
            return {f"realized_{n}_sparsity": 0.0 for n in self.inputs}
        return {f"realized_{n}_sparsity": 1.0 - kept[INPUTS.index(n)] / (tokens * gated_layers * widths[n])
                for n in self.inputs}

    @classmethod
    def from_teal(cls, teal, sparsity: float, n_layers: int, first_layer: int,
                  inputs: tuple[str, ...] = INPUTS) -> "InputSparsity":
        """teal: shadowsparse.teal.TealThresholds (calibration magnitudes per (input, layer)) at ``sparsity``."""
        if not 0.0 < sparsity < 1.0:
            raise ConfigError(f"TEAL sparsity must be in (0, 1) for the engine, got {sparsity}")
        thr = teal.thresholds(sparsity)
        rows = [[float(thr[n, i]) if n in inputs else 0.0 for n in INPUTS] for i in range(n_layers)]
        return cls(torch.tensor(rows), inputs, first_layer, "teal")

    @classmethod
    def from_neuron_thresholds(cls, thresholds: torch.Tensor, first_layer: int) -> "InputSparsity":
        """thresholds (L,) on |a| at the down projection's input (training_free.ThresholdScores)."""
        rows = torch.zeros(thresholds.shape[0], len(INPUTS))
        rows[:, INPUTS.index("ffn_out")] = thresholds.float().cpu()
        return cls(rows, ("ffn_out",), first_layer, "threshold")
