"""FFN selectors that decide inside each gated layer, from that layer's own FFN input (B·T, d), rather than once
per step from the predictor's hidden state: the engine asks ``scores(layer, h)`` just before the FFN runs and keeps
each token's top k (the same rule as the mask path's hooks), then reads only those neurons' rows.

  SketchFFNSelector   the sketch selector (shadowsparse/selectors/verify.py, `sketch`): a packed 2/3-bit copy of
                      W_gate and W_up scores |act(gate)·up| per neuron (kernels/sketch.py; act the FFN's own)
  SketchThresholdFFNSelector  sketch_threshold: the same estimate against a per-layer threshold calibrated on the
                      calibration text (no top-k: a neuron is read when its estimate passes, kernels/ffn.scored_ffn_in)
  GateFFNSelector     CATS (selectors/gate.py, `gate`): the real gate projection in full, |act(gate)| per neuron;
                      the gathered kernels then read the kept rows of gate (again), up and down — at 50% the FFN
                      reads 1/3 + 1/2 of its bytes
"""
from __future__ import annotations

import torch

import torch.nn.functional as F

from ..kernels.ffn import apply_act
from ..kernels.sketch import PackedSketch, sketch_scores, topk_indices
from ..kernels.sketch_x8 import PackedSketchX8, sketch_scores_x8


def ascending_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores (U,) -> (k,) int32: the indices of the k largest, ascending (the gathered kernels' row order)."""
    return scores.topk(k, sorted=False).indices.sort().values.to(torch.int32)


class SketchFFNSelector:
    """sketches: gated layer -> its PackedSketch, or PackedSketchX8 (int8 x, dp4a: kernels/sketch_x8.py), on the
    engine's device; act: the FFN's activation (weights.act: silu for SwiGLU, gelu_tanh for Gemma's GeGLU; the
    engine refuses a selector whose act is not its model's)."""

    name = "sketch"

    def __init__(self, sketches: dict[int, PackedSketch | PackedSketchX8], backend: str = "auto", act: str = "silu"):
        self.sketches, self.backend, self.act = sketches, backend, act

    def scores(self, layer: int, h: torch.Tensor, experts: torch.Tensor | None = None,
               expert_rows: int = 0) -> torch.Tensor:
        """h (n, d) the normed FFN input -> (n, F) fp32 estimates of |act(gate)·up| (fp32 FFMAs on the GPU, rows
        two at a time; the torch fallback on the unpacked copy elsewhere). An MoE layer may pass the step's routed
        ``experts`` (m,) and their ``expert_rows`` (F per expert): only those experts' rows are read, 0 elsewhere."""
        packed = self.sketches[layer]
        score = sketch_scores_x8 if isinstance(packed, PackedSketchX8) else sketch_scores
        return score(h, packed, backend=self.backend, act=self.act, segments=experts, segment_rows=expert_rows)

    def topk(self, layer: int, h: torch.Tensor, k: int) -> torch.Tensor:
        """h (1, d) -> (k,) int32 ascending: one token's k highest-scoring neurons (the bisection top-k kernel on a
        GPU: ~21 us against ~50 for torch.topk on 11008 scores, H200)."""
        return topk_indices(self.scores(layer, h), k, backend=self.backend)[0]

    @property
    def int8_x(self) -> bool:
        """Whether the sketches score int8 x with dp4a (kernels/sketch_x8.py) rather than fp32 x with FFMAs."""
        return any(isinstance(p, PackedSketchX8) for p in self.sketches.values())

    def nbytes(self) -> int:
        """The selector's extra weight bytes (read once per step for every gated layer)."""
        return sum(p.nbytes for p in self.sketches.values())


class SketchThresholdFFNSelector:
    """sketch_threshold (selectors/verify.py): the sketch's estimate of |act(gate)·up| per neuron, kept where it
    exceeds the layer's threshold (the mask path's own, verify.SketchThresholdScores, calibrated as the s-quantile
    of the estimates on the calibration text). No top-k runs in the step: the gate/up kernel reads the rows of the
    neurons that pass (kernels/ffn.scored_ffn_in), the down projection those of the nonzero activations. The
    realized sparsity varies per token; ``kept`` counts the kept (token, neuron) pairs per layer on the device.

    sketch: the SketchFFNSelector whose estimates are thresholded; thresholds: (L,) fp32 (layers before the first
    gated one unused)."""

    name = "sketch_threshold"

    def __init__(self, sketch: SketchFFNSelector, thresholds: torch.Tensor):
        self.sketch, self.act = sketch, sketch.act
        device = next(iter(sketch.sketches.values())).words.device
        self.thresholds = thresholds.float().to(device)
        self.kept = torch.zeros_like(self.thresholds)  # (L,) fp32 kept (token, neuron) pairs

    def scores(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """h (n, d) -> (n, F) fp32 estimates (SketchFFNSelector.scores)."""
        return self.sketch.scores(layer, h)

    def threshold(self, layer: int) -> torch.Tensor:
        """(1,) fp32 on the device: a view, so a captured graph reads the live value."""
        return self.thresholds[layer:layer + 1]

    def counter(self, layer: int) -> torch.Tensor:
        return self.kept[layer:layer + 1]

    def keep(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """h (n, d) -> (n, F) bool: which neurons each token keeps (a many-token step's mask), counted."""
        keep = self.scores(layer, h) > self.threshold(layer)
        self.kept[layer] += keep.sum()
        return keep

    def kept_per_layer(self) -> list[float]:
        """Kept (token, neuron) pairs per layer since the last reset (a host copy)."""
        return self.kept.tolist()

    def reset_counts(self) -> None:
        self.kept.zero_()

    def nbytes(self) -> int:
        return self.sketch.nbytes()

class GateFFNSelector:
    """gates: gated layer -> its W_gate (F, d) (the model's own tensor, on the engine's device); act: the FFN's
    activation. Scores |act(h · W_gate.T)| in the model dtype, as the mask path's hook on gate_proj sees them."""

    name = "gate"

    def __init__(self, gates: dict[int, torch.Tensor], act: str):
        self.gates, self.act = gates, act

    def scores(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """h (n, d) -> (n, F) fp32 |act(gate)|."""
        return apply_act(F.linear(h, self.gates[layer]), self.act).abs().float()

    def topk(self, layer: int, h: torch.Tensor, k: int) -> torch.Tensor:
        """h (1, d) -> (k,) int32 ascending: the token's k largest |act(gate)| (the sketch's top-k kernel on a GPU:
        torch.topk and a sort cost this path 0.60x dense on Llama-2-7B shapes, H100, docs/benchmarks.md)."""
        return topk_indices(self.scores(layer, h), k)[0]

    def nbytes(self) -> int:
        return 0  # reads the model's own W_gate, no copy


class PredictorProposer:
    """predictor_verify's proposer: the per-layer low-rank predictor of the FFN input (verify_predictor.py)."""

    name = "predictor"

    def __init__(self, predictor):
        self.predictor = predictor

    def scores(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        return self.predictor.predict_layer(layer, h).float()  # (n, F)

    def topk(self, layer: int, h: torch.Tensor, k: int) -> torch.Tensor:
        return ascending_topk(self.scores(layer, h)[0], k)

    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.predictor.parameters())


class VerifyFFNSelector:
    """Propose, then verify (shadowsparse/verify.py: sketch_verify, gate_verify, predictor_verify): the proposer
    (a selector above) keeps the top q·F neurons of each token as candidates; the engine computes the true
    a = act(gate)·up of the candidates only (their gate/up rows) and keeps each token's top k of |a| (or of
    |a|·‖W_down[:, i]‖, final="contribution") among its own candidates; the down projection reads the kept rows
    and uses those a values (no second pass over gate/up). The engine runs it in DecodeEngine._ffn_verify."""

    def __init__(self, proposer, q: float, final: str = "activation",
                 columns: dict[int, torch.Tensor] | None = None):
        if final not in ("activation", "contribution") or (final == "contribution" and columns is None):
            raise ValueError(f"final must be 'activation' or 'contribution' (with columns), got {final!r}")
        self.proposer, self.q, self.final, self.columns = proposer, q, final, columns
        self.name = f"{proposer.name}_verify"

    def k_candidates(self, units: int, k: int) -> int:
        """Candidates per token: never fewer than the final keep (verify.VerifyScores' rule)."""
        return max(k, int(round(self.q * units)))

    def final_scores(self, layer: int, a: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """a (n, K) the candidates' activations (rows (K,) their neuron ids; None: all F) -> (n, K) fp32."""
        s = a.abs().float()
        if self.final == "contribution":
            col = self.columns[layer].to(a.device)
            s = s * (col if rows is None else col[rows.long()])
        return s

    def nbytes(self) -> int:
        return self.proposer.nbytes()


class LTEFFNSelector:
    """lte (selectors/lte.py): each routed layer's router scores its experts (groups of neurons) from the FFN input;
    a token keeps its k_experts best experts, whole (the mask path's LTEScores with route="topk"). The engine runs
    the model with the LTE fine-tuned weights swapped in (LTEArtifact.applied), reading only the kept experts' rows.
    routers: lte.routers.Routers; the engine's k must equal k_experts * expert size (selectors/lte.py checks). An MoE
    layer (DecodeEngine._ffn_moe) ranks the neurons by ``scores`` among the token's routed ones: every neuron of a
    group carries its score, so its top k are the token's k_experts best routed groups, whole (as the mask path's)."""

    name = "lte"

    def __init__(self, routers, k_experts: int):
        self.routers, self.k_experts = routers, k_experts

    def scores(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """h (n, d) -> (n, F) fp32: each neuron carries its expert's sigmoid score, so a top-k of k_experts * size
        neurons is the top k_experts experts."""
        return self.routers.to_neurons(layer, self.routers.scores(layer, h)).float()

    def topk(self, layer: int, h: torch.Tensor, k: int) -> torch.Tensor:
        """h (1, d) -> (k,) int32 ascending: the neurons of the token's k_experts best experts."""
        experts = self.routers.scores(layer, h)[0].topk(self.k_experts, sorted=False).indices  # (k_e,)
        groups = self.routers.groups[self.routers.layers.index(layer)]  # (F,) expert id of each neuron
        chosen = torch.zeros(self.routers.n_experts, dtype=torch.bool, device=h.device)
        chosen[experts] = True
        return chosen[groups].nonzero().flatten().to(torch.int32)  # ascending, k_experts * size entries

    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.routers.linears.parameters())
