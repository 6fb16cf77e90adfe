"""weight_bytes_skipped: the fraction of all decoder-linear weight bytes a real kernel would not read per token.

What a skip saves depends on when the decision is made (docs/design.md): a neuron chosen *before* the FFN runs (a
predictor, a static mask) saves its rows of every FFN input projection and its column of the down projection; one
chosen from its own activation (oracle, threshold) saves only the down column, one chosen from the gate (CATS) its
up row and down column. A skipped query head saves its q rows and
o columns; its k/v rows only when every query head of its GQA group is skipped.
"""
from __future__ import annotations

from .arch import ModelView

# When a selector decides (its class attribute ``decision``, shadowsparse/selectors/), hence what a skip saves:
# "early" = before the block runs (all of a neuron's gate/up rows and down column; a head's q rows and o columns, and
# k/v with its whole GQA group); "after_gate" = CATS, the gate ran in full (a neuron saves up and down); "late" = from
# the unit's own output (only the down column / the o columns); "verify" = predict-then-verify (shadowsparse.verify):
# a non-candidate neuron saves its gate/up rows and its down column, a candidate that verification drops saves its
# down column only; "gate_verify" the same with the gate run in full (a non-candidate saves up and down). Input-channel
# selectors (teal) count their own bytes from the hooks.
DECISIONS = ("early", "after_gate", "late", "verify", "gate_verify")


def linear_bytes_per_token(view: ModelView, path: str) -> int:
    """Weight bytes of one decoder linear of a layer that a dense forward reads per token: all of it, or of an MoE
    layer's expert weights the k of E experts a token is routed to."""
    d, s = view.dims, view.spec
    if d.experts and path in (*s.ffn_in, s.ffn_down):  # counted on the experts' Parameters (moe._ExpertView.nbytes)
        return view.module(0, path).nbytes * d.experts_per_token // d.experts
    w = view.weight(0, path)
    return w.numel() * w.element_size()


def ffn_element_size(view: ModelView) -> int:
    """Bytes per element of the FFN's weights: the down projection's, or an MoE layer's experts' Parameters (read
    there, not through moe._ExpertView.weight, which would build a dense (d, E*F) copy)."""
    down = view.ffn_down(0)
    return (down.param if hasattr(down, "param") else down.weight).element_size()


def decoder_linear_bytes(view: ModelView) -> int:
    """Weight bytes of every decoder linear the spec names (q/k/v, o, FFN inputs, down; fused ones once), per token:
    the denominator of every fraction skipped. Read from the spec, not by module type: GPT-2's Conv1D counts too. MoE
    layers count their routed experts' share (linear_bytes_per_token)."""
    return view.dims.n_layers * sum(linear_bytes_per_token(view, p) for p in view.decoder_linears())


def weight_bytes_skipped(view: ModelView, when: str, stats: dict, selector_bytes: int = 0) -> float:
    """Average fraction of decoder-linear weight bytes skipped per token, minus the selector's own bytes; ``when``
    is the selector's decision point (DECISIONS)."""
    if when not in DECISIONS:
        raise ValueError(f"unknown decision point {when!r}; one of {DECISIONS}")
    d = view.dims
    total = decoder_linear_bytes(view)
    if not stats:
        return 0.0
    esize = ffn_element_size(view)
    if when in ("verify", "gate_verify"):  # FFN only; stats carry the counted candidate sparsity
        n_in = view.spec.ffn_in_blocks - (1 if when == "gate_verify" else 0)  # gate+up (a fused one too) or fc1
        n = stats.get("gated_layers", d.n_layers)
        skipped = n * d.active_ffn * d.hidden * esize * (stats["realized_candidate_sparsity"] * n_in
                                                  + stats["realized_ffn_sparsity"])
        return (skipped - selector_bytes) / total
    blocks = view.spec.ffn_in_blocks  # F-row blocks of a neuron in the FFN inputs: gate and up, or fc1
    ffn_mats = {"early": blocks + 1, "after_gate": blocks, "late": 1}[when]
    per_neuron = ffn_mats * d.hidden * esize
    per_head_q_o = (2 if when == "early" else 1) * d.head_dim * d.hidden * esize
    per_kv_group = 2 * d.head_dim * d.hidden * esize if when == "early" else 0
    n = stats.get("gated_layers", d.n_layers)
    skipped = n * (stats["realized_ffn_sparsity"] * d.active_ffn * per_neuron  # of the neurons a token computes
                   + stats["realized_head_sparsity"] * d.n_heads * per_head_q_o)
    if d.n_kv_heads < d.n_heads:
        skipped += n * stats.get("realized_kv_group_sparsity", 0.0) * d.n_kv_heads * per_kv_group
    else:  # MHA: each head owns its k/v rows
        skipped += n * stats["realized_head_sparsity"] * d.n_heads * per_kv_group
    return (skipped - selector_bytes) / total
