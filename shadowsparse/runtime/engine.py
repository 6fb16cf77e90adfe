"""The decode engine: one full decoder forward for 1..64 new tokens per sequence, dense or gated.

    engine = DecodeEngine(extract_weights(model), batch=1, max_len=512, config=EngineConfig(ffn_sparsity=0.5))
    logits = engine.prefill(prompt_ids)                      # (B, P, V), in steps of <= 64 tokens
    logits = engine.step(next_ids, pos)                      # (B, T, V)

Gating per step (layers >= first_layer): the scores come from the SharedPredictor (run once on the hidden state
entering layer feature_layer + 1, top-k on device) or are given per call (heads (B, T, L, H), neurons
(B, T, L, F), the layout of gating.TensorScores; fixed_scores.FixedScores serves the static selector's means in the
predictor's place); or, for the FFN, a per-layer selector (ffn_selector=: ffn_select.SketchFFNSelector or
GateFFNSelector) scores each gated layer's neurons from that layer's own FFN input just before it runs, and
ffn_select.VerifyFFNSelector proposes candidates that _ffn_verify verifies by their true |a|.
FFN: gated_ffn reads only the selected rows of gate/up (fc1) and
of the transposed down projection. Heads: the q rows, the attention and the o rows of unselected query heads are
skipped. With 1 < B·T <= 16 tokens the rows read are one set per layer (select.py: "union", exact per-token
semantics, or "vote", one fixed-size set); with more, see "Many tokens" below.

Input thresholds (input_sparsity=, runtime/input_sparsity.py): instead of choosing units, teal zeroes each
projection input's channels with |x| <= the layer's threshold and threshold does so for the down projection's
input |a|; kernels/sparse_input.py then reads only the weight rows of the kept channels (q/k/v and gate/up from
transposed copies made here, o and down from the transposed weights the gathered kernels use). One selector per
block: input thresholds on a block that heads/neurons gating also covers are refused. (self.teal holds the
thresholds of either method.) A batch reads the union of its tokens' kept channels, which at 40-50% per token is
nearly every channel from a few tokens on; so a step of more than ``sparse_input_tokens`` rows zeroes each
thresholded input where it is made instead — the norm kernel for q/k/v and gate/up (fc1) of pre-norm layers, one
small kernel for the attention output and for act(gate)*up — and runs the dense GEMM on it: the mask path's own
arithmetic at dense speed, with the kept channels still counted.

K/V of skipped heads (kv="lazy"): a later token may select a head that earlier tokens skipped, and then needs
that head's keys and values at every earlier position. kv="dense" computes every head's K/V at every token
(correct, but the K/V projections are then 2/3 of the attention bytes that head gating cannot skip). kv="lazy"
keeps the normed inputs of the last W positions (cache.InputWindow) and, at each single-token step, recomputes
K/V over those W positions for the selected heads plus r = ceil(H / W) "refresh" heads that rotate through all
heads. Why that is exact: every head is refreshed within any W consecutive steps, and a refresh rewrites the last
W positions, so a position older than W steps holds valid K/V for every head; the positions of the last W steps
are rewritten for each selected head before its attention runs. A multi-token step (prefill) first recomputes
every head over the window, then computes its own tokens' K/V densely, so lazy steps can follow any history.
The W rows cost one weight read (they share the GEMV, tokens padded to 16), hence batch * W <= 16.

Gated layers of a pre-norm model keep the residual stream in fp32: the out-projection and FFN-down kernels add
into it with their fp32 atomics and the norms read it, which removes a copy-in, a cast-out and a bias add per
sub-block (small kernels that cost as much as the bytes they touch at decode). Dense layers keep the model dtype.

Many tokens (prefill): a step of B·T > 16 rows would make the gathered kernels re-read the selected rows once per
16 tokens, and the tokens' union covers nearly every unit anyway. Its gated layers therefore run the mask path
itself on cuBLAS GEMMs: every head's q/k/v and every neuron computed, each token's unselected heads and neurons
zeroed by its own top-k mask (exact per-token semantics, whatever batch_set says), one pass over the weights for
all the step's tokens. benchmark.py's prefill rows measure both ways (docs/benchmarks.md).

Dense fallback (EngineConfig.fallback = "measured", what generation uses): a step of more token rows than the
engine's path was measured to win at (dispatch.py) runs every head and neuron on the dense kernels — the dense
model's output, never slower than dense. Lazy K/V stays exact across it: the step first refreshes every head over
the window and writes its own normed inputs into the window. Evaluation keeps "never" (every step gated).

Families (weights.py): all but OPT run the "llama" structure. Qwen3's per-head q/k RMSNorms run between every q/k
projection and its RoPE (_head_norm_: dense, gated q, the lazy window and its refresh, input-sparse q/k/v); Gemma's
sqrt(d) embedding scale is applied at the first layer's entry (_scale_embeddings), its 1 + w norm factors and GeGLU
(gelu_tanh) go through the same kernels as every family's. Gemma-2/3's sandwich norms wrap each sub-block
(_add_normed), Gemma-2's attention scores are soft-capped inside the attention kernels and its logits after lm_head.
Sliding-window layers pass their window to the attention (keys before it never read; the cache keeps every position,
so a layer's window is exact at any max_len). Each layer rotates with its own RoPE (Gemma-3: two bases, _ropes).
Mixture-of-experts layers (Mixtral, Qwen3-MoE) run _ffn_moe: the model's router picks each token's experts, the
selector a top-k among their neurons, and one gathered FFN reads the kept rows with the routing weights in keep.

Every shape is fixed by (batch, T, config) and nothing reads a device value on the host, so graph.py can capture a
step in a CUDA graph.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..gating import n_keep, topk_mask
from ..kernels.attention import causal_visible, decode_attention, prefill_attention, soft_cap
from ..kernels.common import BACKENDS
from ..kernels.ffn import apply_act, gated_ffn, scored_ffn_in
from ..kernels.kv_window import kv_window_write
from ..kernels.linear import LAZY_QKV, row_linear, row_linear_t
from ..kernels.nm24 import compress_24, nm24_linear, nm24_linear_t, prune_24
from ..kernels.rope_norm import layer_norm, rms_norm, rope_
from ..kernels.sketch import topk_indices
from ..kernels.sparse_input import act_input_sparse_linear, act_mask_input, input_sparse_linear, mask_input
from .dispatch import path_of, runs_dense as fallback_rule, validate as validate_fallback
from .cache import InputWindow, StaticKVCache
from .ffn_select import GateFFNSelector, LTEFFNSelector, SketchFFNSelector, SketchThresholdFFNSelector, \
    VerifyFFNSelector
from .input_sparsity import InputSparsity
from .ops import OPT_POSITION_OFFSET, rope_cos_sin, rope_inv_freq
from .select import BATCH_SETS, head_rows, padded_size, select_units
from .weights import EngineWeights, moe_in_rows

MAX_BATCH = 8
MAX_STEP_TOKENS = 64  # new tokens per sequence in one step (prefill() cuts prompts into steps of this size)
PREFILL_TOKENS = 16  # query tokens per sequence above which attention runs as torch's fused SDPA (every head)
KERNEL_TOKENS = 16  # the shared-set kernels take up to 16 token rows per call; a step with more rows in all
# (B·T > 16) runs its gated layers as the mask path on cuBLAS GEMMs (module docstring: "Many tokens")
# an MoE step with fewer routed (token, expert) slots than experts scores the sketch on its routed experts' rows only;
# SHADOWSPARSE_MOE_SKETCH_ROUTED=0 scores every expert (the benchmark's A/B)
MOE_SKETCH_ROUTED = os.environ.get("SHADOWSPARSE_MOE_SKETCH_ROUTED", "1") != "0"


@dataclass
class EngineConfig:
    ffn_sparsity: float = 0.0  # fraction of FFN neurons skipped per token in every gated layer
    head_sparsity: float = 0.0  # fraction of query heads skipped per token in every gated layer
    first_layer: int | None = None  # first gated layer; None: predictor.feature_layer + 1, or 0 with given scores
    batch_set: str = "union"  # rows read with several tokens per step: "union" (exact) or "vote" (fixed size)
    backend: str = "auto"  # kernels: "auto" (Triton on CUDA, torch elsewhere), "triton", "torch"
    nm24: bool = False  # FFN weights pruned to 2:4 (magnitude) and stored compressed (kernels/nm24.py)
    kv: str = "auto"  # K/V of gated layers under head gating: "dense", "lazy" (module docstring) or "auto" (lazy
    # where it is exact and reads fewer bytes: no grouped K/V heads, batch * window <= 16)
    kv_window: int = 16  # W, the positions lazy K/V recomputes per step ("auto" shrinks it to 16 // batch)
    all_kernels: bool = False  # run the gated path with every unit selected: the dense model through the gathered
    # kernels and the fp32 residual stream (benchmark: is the dense baseline faster through cuBLAS or through them?)
    sparse_input_tokens: int = 2  # input thresholds (teal, threshold): steps of up to this many token rows read
    # only the kept weight rows (kernels/sparse_input.py); larger steps zero the inputs where they are made and run
    # the dense GEMM (module docstring: "Input thresholds"). 0: always the dense GEMM
    fallback: str | int = "never"  # "never": every step gated (the mask path's semantics: evaluation, tests);
    # "measured": a step of more token rows than its path was measured to win at runs dense (dispatch.py: never
    # slower than dense; generation); an int N: dense above N rows

    def validate(self) -> "EngineConfig":
        for name in ("ffn_sparsity", "head_sparsity"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0.0 <= v < 1.0):
                raise ConfigError(f"{name} must be in [0, 1) (the fraction skipped), got {v!r}")
        if self.batch_set not in BATCH_SETS:
            raise ConfigError(f"batch_set must be one of {BATCH_SETS}, got {self.batch_set!r}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be 'auto', 'triton' or 'torch', got {self.backend!r}")
        if self.kv not in ("auto", "dense", "lazy"):
            raise ConfigError(f"kv must be 'auto', 'dense' or 'lazy', got {self.kv!r}")
        if not (isinstance(self.kv_window, int) and self.kv_window >= 2):
            raise ConfigError(f"kv_window must be an integer >= 2, got {self.kv_window!r}")
        if not (isinstance(self.sparse_input_tokens, int) and 0 <= self.sparse_input_tokens <= KERNEL_TOKENS):
            raise ConfigError(f"sparse_input_tokens must be an integer in 0..{KERNEL_TOKENS}, got "
                              f"{self.sparse_input_tokens!r}")
        validate_fallback(self.fallback)
        return self


@dataclass
class Selection:
    """One step's index sets for the gated layers (index 0 = first_layer)."""
    ffn_idx: torch.Tensor | None = None  # (Lg, Kf) int32
    ffn_keep: torch.Tensor | None = None  # (Lg, n, Kf) or None
    heads: torch.Tensor | None = None  # (Lg, Kh) int32 query heads
    head_rows: torch.Tensor | None = None  # (Lg, Kh*D) int32 rows of W_q / W_o.T
    head_keep: torch.Tensor | None = None  # (Lg, n, Kh) or None
    kv_heads: torch.Tensor | None = None  # (Lg, Kh + r) int32: lazy K/V's heads (selected, then refresh)
    kv_rows: torch.Tensor | None = None  # (Lg, 2*(Kh + r)*D) int32 rows of the K/V weight (keys, then values)
    qkv_rows: torch.Tensor | None = None  # (Lg, Kh*D + 2*(Kh + r)*D) rows of the fused q/k/v weight (lazy K/V)
    masked: bool = False  # B·T > KERNEL_TOKENS: per-token masks on dense GEMMs instead of index sets
    head_scores: torch.Tensor | None = None  # masked: (n, Lg, H), each token keeps its own top-k heads
    neuron_scores: torch.Tensor | None = None  # masked: (n, Lg, F)


class DecodeEngine:
    def __init__(self, weights: EngineWeights, batch: int, max_len: int, config: EngineConfig | None = None,
                 predictor: torch.nn.Module | None = None, ffn_selector=None,
                 input_sparsity: InputSparsity | None = None):
        self.w = weights
        self.cfg = (config or EngineConfig()).validate()
        if not 1 <= batch <= MAX_BATCH:
            raise ConfigError(f"batch must be in 1..{MAX_BATCH}, got {batch}; split larger batches into several "
                              "engines")
        if weights.family == "opt" and max_len > weights.max_positions:
            raise ConfigError(f"max_len {max_len} exceeds the model's {weights.max_positions} learned positions")
        self.batch, self.max_len = batch, max_len
        self.device, self.dtype = weights.device, weights.dtype
        w = weights
        self.n_q = w.n_heads * w.head_dim
        self.cache = StaticKVCache(w.n_layers, batch, w.n_kv_heads, max_len, w.head_dim, self.dtype, self.device)
        self.all_heads = torch.arange(w.n_heads, device=self.device, dtype=torch.int32)
        # each layer's RoPE inverse frequencies (D/2,) fp32, one tensor per distinct (theta, linear factor): the
        # ropes of a step are computed once per tensor (Gemma-3: two, local and global); None for OPT
        freqs = {r: rope_inv_freq(w.head_dim, r[0], self.device) / r[1] for r in set(w.layer_rope)}
        self.layer_inv_freq = [freqs[r] for r in w.layer_rope] if w.family == "llama" else [None] * w.n_layers
        self.inv_freq = self.layer_inv_freq[0]  # None: no RoPE (OPT)
        self.scale = w.attn_scale if w.attn_scale is not None else w.head_dim ** -0.5
        self.predictor = predictor
        if predictor is not None:
            if predictor.dims["n_layers"] != w.n_layers or predictor.dims["ffn"] != w.ffn or \
                    predictor.dims["n_heads"] != w.n_heads:
                raise ConfigError(f"predictor dims {predictor.dims} do not match the model's "
                                  f"(layers {w.n_layers}, heads {w.n_heads}, ffn {w.ffn})")
            self.predictor = predictor.to(device=self.device, dtype=self.dtype).eval()
            self.predict_at = predictor.feature_layer + 1
        first = self.cfg.first_layer
        if first is None:
            first = self.predict_at if predictor is not None else \
                (input_sparsity.first_layer if input_sparsity is not None else 0)
        if not 0 <= first < w.n_layers or (predictor is not None and first < self.predict_at):
            lo = self.predict_at if predictor is not None else 0
            raise ConfigError(f"first_layer must be in [{lo}, {w.n_layers - 1}], got {first}")
        self.first_layer = first
        self.k_heads = n_keep(w.n_heads, self.cfg.head_sparsity)
        self.k_ffn = n_keep(w.active_ffn, self.cfg.ffn_sparsity)  # MoE: a share of the routed experts' neurons
        self.gate_heads = self.k_heads < w.n_heads or self.cfg.all_kernels
        self.gate_ffn = self.k_ffn < w.active_ffn or self.cfg.all_kernels
        # a per-layer FFN selector (ffn_select.py) chooses each gated layer's neurons from that layer's own input
        self.ffn_selector = ffn_selector if self.k_ffn < w.active_ffn else None
        if self.ffn_selector is not None and self.cfg.nm24:
            raise ConfigError("a per-layer FFN selector over 2:4-compressed FFN weights is not implemented; use "
                              "nm24=False with it")
        # a selector that scores act(gate) (sketch, gate; or a verifier's proposer) must apply the model's act
        scorer = getattr(self.ffn_selector, "proposer", self.ffn_selector)
        if getattr(scorer, "act", w.act) != w.act:
            raise ConfigError(f"the {scorer.name} FFN selector scores with act '{scorer.act}', but the model's FFN "
                              f"uses '{w.act}'; build it with act=extract_weights(model).act")
        self.teal = self._plan_input_sparsity(input_sparsity)
        if w.experts:
            self._check_moe()
        self.nm24 = [_compress_ffn(lw) for lw in w.layers] if self.cfg.nm24 else None
        self.all_neurons = torch.arange(w.ffn, device=self.device, dtype=torch.int32)
        self.zero_threshold = torch.zeros(1, device=self.device)  # |a| > 0: the nonzero activations' down rows
        self.window = self._plan_lazy_kv()
        self.window_rope = None  # per layer (cos, sin) (W, D) fp32 of the window's positions, per lazy step (Llama)
        # the fp32 residual stream (module docstring); not where input thresholds are the only gating and every
        # decode step is above sparse_input_tokens rows: those steps run cuBLAS GEMMs, which fuse the residual add
        # in the model dtype, so an fp32 stream would only add a cast and an add pass per sub-block
        dense_steps = self.teal is not None and not (self.gate_heads or self.gate_ffn or self.ffn_selector) and \
            batch > self.cfg.sparse_input_tokens
        self.resid32 = self.gated and w.norm_before and not dense_steps
        self.all_q_rows = torch.arange(self.n_q, device=self.device, dtype=torch.int32)
        self.path = path_of(self._features())

    def _check_moe(self) -> None:
        """An MoE model's FFN runs _ffn_moe: routed experts, optionally a top-k of their neurons by scores (given, the
        predictor's, or a scoring selector's). The FFN paths built around one dense neuron set are refused here."""
        sel = self.ffn_selector
        what = None
        if self.cfg.nm24:
            what = "2:4-compressed FFN weights (nm24=True)"
        elif self.teal is not None and (self.teal.on("ffn_in") or self.teal.on("ffn_out")):
            what = "input thresholds on the FFN (teal / threshold on ffn_in or ffn_out)"
        elif sel is not None and not isinstance(sel, (SketchFFNSelector, GateFFNSelector, LTEFFNSelector)):
            what = f"the {type(sel).__name__} FFN selector"
        if what is not None:
            raise ConfigError(f"{what} is not implemented for mixture-of-experts models in the decode engine, which "
                              "serves their routed experts with a top-k of given, predicted, sketch, gate or LTE "
                              "router scores; "
                              "use the mask path (load_gated(..., engine='hooks')) for this method")

    def _features(self) -> set[str]:
        """The gating features of this engine: the key of its measured break-even (dispatch.py)."""
        sel = self.ffn_selector
        feats = {"ffn"} if self.gate_ffn and self.teal is None else set()
        feats |= {"heads"} if self.gate_heads else set()
        feats |= {"predictor"} if self.predictor is not None else set()
        if isinstance(sel, VerifyFFNSelector):
            feats.add("verify")
            sel = sel.proposer
        feats |= {"sketch"} if isinstance(sel, SketchFFNSelector) else set()
        feats |= {"sketch", "threshold"} if isinstance(sel, SketchThresholdFFNSelector) else set()
        feats |= {"gate"} if isinstance(sel, GateFFNSelector) else set()
        feats |= {"lte"} if isinstance(sel, LTEFFNSelector) else set()
        feats |= {self.teal.label} if self.teal is not None else set()
        feats |= {"nm24"} if self.cfg.nm24 else set()
        feats |= {"moe"} if self.w.experts and feats else set()  # routed experts: their own measurements
        scorer = getattr(sel, "sketch", sel)  # sketch_threshold wraps the sketch
        if isinstance(scorer, SketchFFNSelector) and scorer.int8_x:
            feats.add("x8")  # the dp4a scoring kernel: its own measurements where they exist
        return feats

    def sketch_reads_routed(self, slots: int) -> bool:
        """Whether an MoE step with ``slots`` routed (token, expert) pairs scores the sketch on its routed experts'
        packed rows only: with fewer slots than experts (one token, or a few; else every expert is read anyway)."""
        return bool(self.w.experts) and isinstance(self.ffn_selector, SketchFFNSelector) and \
            slots < self.w.experts and MOE_SKETCH_ROUTED

    def runs_dense(self, rows: int, prefill: bool = False) -> bool:
        """Whether a step of ``rows`` token rows (prefill: several tokens per sequence) runs dense: the config's
        fallback rule on this engine's path (dispatch.py); never for an ungated engine or the all-kernels benchmark
        baseline."""
        return self.gated and not self.cfg.all_kernels and \
            fallback_rule(self.path, rows, self.cfg.fallback, cuda=self.device.type == "cuda", prefill=prefill)

    def _plan_input_sparsity(self, sp: InputSparsity | None) -> InputSparsity | None:
        """Thresholds on the projection inputs (input_sparsity.py) on the device, and the transposed copies of the
        q/k/v and gate/up (fc1) weights their kernels read (row k = input channel k); o and down have theirs."""
        self.t_qkv, self.t_fcin, self.b_fcin = {}, {}, {}
        if sp is None:
            return None
        clash = [n for n in sp.inputs if (n.startswith("attn") and self.gate_heads) or
                 (n.startswith("ffn") and (self.gate_ffn or self.ffn_selector is not None))]
        if clash:
            raise ConfigError(f"{sp.label} thresholds {clash} while heads/neurons of the same block are gated by "
                              "another selector: gate each block (attention, FFN) by one selector")
        if self.cfg.nm24:
            raise ConfigError("input sparsity over 2:4-compressed weights is not implemented; use nm24=False")
        if sp.thresholds.shape[0] != self.w.n_layers:
            raise ConfigError(f"{sp.label} has thresholds for {sp.thresholds.shape[0]} layers, the model has "
                              f"{self.w.n_layers}")
        if self.batch > self.cfg.sparse_input_tokens:  # every step runs the dense GEMMs: no transposed copies
            return sp.to(self.device, self.dtype)
        for layer in range(self.first_layer, self.w.n_layers):
            lw = self.w.layers[layer]
            if sp.on("attn_in"):
                self.t_qkv[layer] = lw.qkv_w.t().contiguous()  # (d, H*D + 2*KV*D)
            if sp.on("ffn_in"):
                fc = lw.w_in if lw.w_up is None else torch.cat([lw.w_in, lw.w_up])  # (F or 2F, d)
                self.t_fcin[layer] = fc.t().contiguous()  # (d, F or 2F): gate then up in one GEMV
                self.b_fcin[layer] = lw.b_in  # OPT fc1's bias (no up projection there)
        return sp.to(self.device, self.dtype)

    def input_sparsity_bytes(self) -> int:
        """Extra bytes held for input sparsity: the transposed q/k/v and gate/up copies (the originals stay for the
        dense layers and the benchmark's dense baseline)."""
        return sum(t.nbytes for t in (*self.t_qkv.values(), *self.t_fcin.values()))

    def input_widths(self) -> dict[str, int]:
        """Channels of each projection input (input_sparsity.INPUTS)."""
        w = self.w
        return {"attn_in": w.hidden, "attn_out": self.n_q, "ffn_in": w.hidden, "ffn_out": w.ffn}

    def reset_counts(self) -> None:
        """Zero the device counters of kept input channels (after warm-up steps that ran no real token)."""
        if self.teal is not None:
            self.teal.kept.zero_()

    def _plan_lazy_kv(self) -> InputWindow | None:
        """The input window of lazy K/V, or None for dense K/V (module docstring)."""
        w, cfg = self.w, self.cfg
        if cfg.kv == "dense" or (cfg.kv == "auto" and not self.gate_heads):
            return None
        window = cfg.kv_window if cfg.kv == "lazy" else min(cfg.kv_window, KERNEL_TOKENS // self.batch)
        refresh = -(-w.n_heads // max(window, 1))
        why_not = None
        if not self.gate_heads:
            why_not = "it needs head gating (head_sparsity > 0)"
        elif w.n_kv_heads != w.n_heads:
            why_not = "the model groups K/V heads (GQA): its K/V projections are small already"
        elif window < 2 or self.batch * window > KERNEL_TOKENS:
            why_not = f"batch * kv_window must be <= {KERNEL_TOKENS} (got {self.batch} * {window})"
        elif padded_size(self.batch, self.k_heads, w.n_heads, cfg.batch_set) + refresh >= w.n_heads:
            kh = padded_size(self.batch, self.k_heads, w.n_heads, cfg.batch_set)
            why_not = f"{kh} selected + {refresh} refresh heads read every head's K/V"
        if why_not:
            if cfg.kv == "lazy":
                raise ConfigError(f"kv='lazy' is not possible here: {why_not}; use kv='dense' or 'auto'")
            return None
        self.kv_refresh = refresh
        self.kv_step = torch.zeros(1, dtype=torch.long, device=self.device)  # advanced in every select()
        self.refresh_offsets = torch.arange(refresh, device=self.device)
        return InputWindow(w.n_layers - self.first_layer, self.batch, window, w.hidden, self.max_len, self.dtype,
                           self.device)

    @property
    def gated(self) -> bool:
        return self.gate_heads or self.gate_ffn or self.teal is not None

    @property
    def counts_kept_neurons(self) -> bool:
        """Whether the FFN selector counts its kept neurons per layer on the device (a threshold keeps a varying
        number; a top-k keeps k_ffn, counted by the caller)."""
        return isinstance(self.ffn_selector, SketchThresholdFFNSelector)

    def _needs_scores(self) -> bool:
        """Whether a step must be given scores (no predictor): heads gated, or neurons without a per-layer selector."""
        return self.predictor is None and (self.gate_heads or (self.gate_ffn and self.ffn_selector is None))

    # -- selection -------------------------------------------------------------------------------------------------
    def select(self, heads: torch.Tensor | None, neurons: torch.Tensor | None) -> Selection:
        """heads (B, T, L, H), neurons (B, T, L, F) -> this step's index sets for layers >= first_layer (or, for a
        step of more than KERNEL_TOKENS rows, the per-token scores its masks come from). step() calls it once per
        step (with lazy K/V it advances the refresh rotation); benchmark.py times it alone, after the predictor."""
        s = neurons if neurons is not None else heads
        if s is None:  # the FFN decides per layer (ffn_selector) and heads are not gated: nothing to choose here
            return Selection()
        if s.shape[0] * s.shape[1] > KERNEL_TOKENS:
            lg = slice(self.first_layer, None)
            return Selection(masked=True,
                             head_scores=heads[:, :, lg].flatten(0, 1) if self.gate_heads else None,
                             neuron_scores=neurons[:, :, lg].flatten(0, 1) if self.gate_ffn and neurons is not None
                             else None)
        sel = Selection()
        mode = self.cfg.batch_set
        if self.gate_ffn and neurons is not None and self.w.experts:  # top-k among the routed, in the layer
            sel.neuron_scores = neurons[:, :, self.first_layer:].flatten(0, 1)  # (n, Lg, E*F)
        elif self.gate_ffn and neurons is not None:
            s = neurons[:, :, self.first_layer:].flatten(0, 1)  # (n, Lg, F)
            sel.ffn_idx, keep = select_units(s, self.k_ffn, mode)
            sel.ffn_keep = None if keep is None else keep.to(self.dtype)
        if self.gate_heads:
            s = heads[:, :, self.first_layer:].flatten(0, 1)  # (n, Lg, H)
            sel.heads, keep = select_units(s, self.k_heads, mode)
            sel.head_rows = head_rows(sel.heads, self.w.head_dim)
            sel.head_keep = None if keep is None else keep.to(self.dtype)
            if self.window is not None:
                H, r = self.w.n_heads, self.kv_refresh
                refresh = ((self.kv_step * r + self.refresh_offsets) % H).to(torch.int32)  # (r,) rotating
                self.kv_step.add_(1)
                sel.kv_heads = torch.cat([sel.heads, refresh.expand(sel.heads.shape[0], r)], dim=1)
                rows = head_rows(sel.kv_heads, self.w.head_dim)  # key rows; the value rows follow H*D later
                sel.kv_rows = torch.cat([rows, rows + H * self.w.head_dim], dim=1)
                sel.qkv_rows = torch.cat([sel.head_rows, sel.kv_rows + self.n_q], dim=1)
        return sel

    def rows_read(self, tokens: int) -> dict:
        """Per gated layer, the fixed number of heads and neurons whose weights a step of ``tokens`` rows reads."""
        mode = self.cfg.batch_set
        kh = padded_size(tokens, self.k_heads, self.w.n_heads, mode) if self.gate_heads else self.w.n_heads
        # an MoE step reads the union of its tokens' routed neurons (at most all E*F) in every layer
        dense_kf = padded_size(tokens, self.w.active_ffn, self.w.ffn, "union") if self.w.experts else self.w.ffn
        kf = padded_size(tokens, self.k_ffn, self.w.ffn, mode) if self.gate_ffn else dense_kf
        lazy = self.window is not None and tokens == self.batch  # single-token steps
        kv = kh + self.kv_refresh if lazy else self.w.n_kv_heads
        return {"heads": kh, "neurons": kf, "dense_neurons": dense_kf, "kv_heads": kv,
                "window": self.window.window if lazy else 0}

    # -- the step ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, ids: torch.Tensor, pos, heads: torch.Tensor | None = None,
             neurons: torch.Tensor | None = None) -> torch.Tensor:
        """ids (B, T) of new tokens at positions pos .. pos+T-1 (pos: int or (1,) int64 tensor) -> logits (B, T, V)."""
        B, T = ids.shape
        if B != self.batch:
            raise ConfigError(f"engine was built for batch {self.batch}, got {B}")
        if not 1 <= T <= MAX_STEP_TOKENS:
            raise ConfigError(f"a step takes 1..{MAX_STEP_TOKENS} new tokens per sequence, got {T}; use prefill()")
        if self._needs_scores() and ((self.gate_ffn and neurons is None and self.ffn_selector is None)
                                     or (self.gate_heads and heads is None)):
            raise ConfigError("a gated engine without a predictor needs scores: step(ids, pos, heads=, neurons=)")
        w = self.w
        fresh = not torch.is_tensor(pos) and pos == 0  # a new sequence: no earlier K/V to refresh
        dense = self.runs_dense(B * T, T > 1)  # the step falls back to every head and neuron (dispatch.py)
        if not torch.is_tensor(pos):
            if pos + T > self.max_len:
                raise ConfigError(f"positions up to {pos + T} exceed the cache's max_len {self.max_len}")
            pos = torch.tensor([pos], device=self.device, dtype=torch.long)
        positions = pos + torch.arange(T, device=self.device)  # (T,)
        self._visible = {}  # window width (None: full) -> the causal mask of a many-token step, made once a step
        if self.window is not None:
            # before a step that computes K/V densely (several tokens, or a dense fallback): the window's positions
            # get every head's K/V, so the lazy invariant holds whatever steps follow (module docstring)
            if (T > 1 or dense) and not fresh:
                self._refresh_all_kv()
            self.window.advance(positions)
            if self.inv_freq is not None and T == 1:  # the window's q and k are rotated at their own positions
                self.window_rope = self._ropes(self.window.positions, torch.float32)
        x = F.embedding(ids, w.embed)  # (B, T, d_embed)
        rope = None
        if w.family == "opt":
            if w.project_in is not None:
                x = F.linear(x, w.project_in)
            x = x + F.embedding(positions + OPT_POSITION_OFFSET, w.pos_embed)
        else:
            rope = self._ropes(positions, self.dtype)  # per layer (cos, sin) (T, D)
        sel = None
        if self.gated and self.predictor is None and not dense:
            sel = self.select(heads, neurons)
        for layer in range(w.n_layers):
            if self.predictor is not None and self.gated and not dense and layer == self.predict_at:
                p_heads, p_neurons = self.predictor(x)  # (B, T, L, H), (B, T, L, F)
                sel = self.select(p_heads, None if self.ffn_selector is not None else p_neurons)
            if sel is not None and self.ffn_selector is not None:
                sel.masked = sel.masked or B * T > KERNEL_TOKENS
            gi = layer - self.first_layer
            if gi == 0 and self.resid32 and not dense:
                x = x.float()  # (B, T, d) fp32 from here on (module docstring)
            x = self._layer(layer, x, pos, positions, None if rope is None else rope[layer], sel if gi >= 0 else None,
                            gi)
        be, dt = self.cfg.backend, self.dtype
        if w.family == "opt":
            if w.final_norm_w is not None:
                x = layer_norm(x, w.final_norm_w, w.final_norm_b, w.eps, backend=be, out_dtype=dt)
            if w.project_out is not None:
                x = F.linear(x.to(dt), w.project_out)
        else:
            x = rms_norm(x, w.final_norm_w, w.eps, backend=be, out_dtype=dt)
        return soft_cap(F.linear(x.to(dt), w.lm_head), w.logit_softcap)  # (B, T, V); Gemma-2 caps the logits

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, start: int = 0, heads=None, neurons=None,
                step_tokens: int = MAX_STEP_TOKENS) -> torch.Tensor:
        """ids (B, P) from position ``start``, in steps of <= step_tokens tokens -> logits (B, P, V). Scores, if
        given, are (B, P, L, U) and are sliced per step."""
        if not 1 <= step_tokens <= MAX_STEP_TOKENS:
            raise ConfigError(f"step_tokens must be in 1..{MAX_STEP_TOKENS}, got {step_tokens}")
        out = []
        for t0 in range(0, ids.shape[1], step_tokens):
            t1 = min(ids.shape[1], t0 + step_tokens)
            h = None if heads is None else heads[:, t0:t1]
            n = None if neurons is None else neurons[:, t0:t1]
            out.append(self.step(ids[:, t0:t1], start + t0, heads=h, neurons=n))
        return torch.cat(out, dim=1)

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Greedy decoding without graphs (graph.py has the captured twin): ids (B, P) -> (B, P + new_tokens)."""
        if self._needs_scores():
            raise ConfigError("generate() needs a predictor (or a per-layer FFN selector) to choose the index sets "
                              "of new tokens")
        logits = self.prefill(ids)
        out = [ids, logits[:, -1:].argmax(-1)]
        for i in range(new_tokens - 1):
            logits = self.step(out[-1], ids.shape[1] + i)
            out.append(logits[:, -1:].argmax(-1))
        return torch.cat(out, dim=1)

    def _ropes(self, positions, dtype) -> list:
        """Each layer's (cos, sin) (T, D) in dtype at positions (T,): computed once per distinct inverse-frequency
        tensor (one for most families, two for Gemma-3's local and global layers)."""
        made = {}
        for f in self.layer_inv_freq:
            if id(f) not in made:
                made[id(f)] = rope_cos_sin(positions, f, dtype)
        return [made[id(f)] for f in self.layer_inv_freq]

    def _refresh_all_kv(self) -> None:
        """Every head's K/V over the window's positions, in every gated layer (before a multi-token step)."""
        W, B = self.window.window, self.batch
        for gi in range(self.window.h.shape[0]):
            layer = gi + self.first_layer
            lw = self.w.layers[layer]
            kv = _linear(self.window.h[gi].view(B * W, -1), lw.kv_w(self.n_q),
                         None if lw.qkv_b is None else lw.qkv_b[self.n_q:])  # (B*W, 2*H*D)
            self._head_norm_(kv, lw.k_norm_w, self.w.n_kv_heads)  # Qwen3's k norm (no-op elsewhere)
            kv_window_write(kv, self.cache.keys[layer], self.cache.values[layer], self.all_heads,
                            self.window.positions, self.layer_inv_freq[layer], backend=self.cfg.backend)

    # -- one decoder layer ---------------------------------------------------------------------------------------------
    def _norm(self, x, w, b, gi: int | None = None, thresholded: tuple[int, str] | None = None):
        """x (B, T, d) in the model dtype or fp32 (the residual stream of gated layers) -> model dtype. With gi
        (a lazy K/V step, T = 1), the output goes to gated layer gi's slot of the input window; returns None.
        thresholded (layer, input name): the output is that projection input, zeroed where |h| <= its threshold."""
        kw = dict(backend=self.cfg.backend, out_dtype=self.dtype)
        if gi is not None:
            kw.update(window=self.window.h[gi], slot=self.window.slot)
        if thresholded is not None:
            kw.update(threshold=self.teal.threshold(*thresholded), count=self.teal.counter(*thresholded))
        if self.w.family == "llama":
            y = rms_norm(x, w, self.w.eps, **kw)
        else:
            y = layer_norm(x, w, b, self.w.eps, **kw)
        return None if gi is not None else y

    def _lazy(self, sel: Selection | None, T: int) -> bool:
        """Whether this gated layer's step computes K/V lazily (module docstring): single tokens only."""
        return sel is not None and sel.heads is not None and self.window is not None and T == 1

    def _head_norm_(self, t, weight, heads: int, col0: int = 0) -> None:
        """Qwen3's q_norm / k_norm: RMSNorm over each of ``heads`` heads of t (rows, C), columns col0 onwards, in place,
        before RoPE (weight (D,); None: the family has none, nothing to do). Each head is rounded to the model dtype
        first, as the model's projection output is, and normed into it: every q/k path (dense, gated q, lazy window,
        input-sparse) calls this between its projection and its rotation."""
        if weight is None:
            return
        D = self.w.head_dim
        part = t[:, col0:col0 + heads * D]  # (rows, heads*D), a column slice of the projection output
        normed = rms_norm(part.reshape(-1, D).to(self.dtype), weight, self.w.eps, backend=self.cfg.backend)
        part.copy_(normed.view(part.shape))

    def _scale_embeddings(self, x):
        """Gemma: the embedding rows times sqrt(d) (EngineWeights.embed_scale), rounded in the model dtype as the
        model rounds them. step() looks the rows up unscaled (the tied lm_head is the same tensor, so no scaled (V, d)
        copy is kept) and the first layer scales them here; an fp32 residual stream holds those model-dtype rows
        exactly, so the round trip through the model dtype changes nothing but the product's rounding."""
        return (x.to(self.dtype) * self.w.embed_scale).to(x.dtype)

    def _layer(self, layer, x, pos, positions, rope, sel: Selection | None, gi: int):
        lw = self.w.layers[layer]
        if layer == 0 and self.w.embed_scale is not None:
            x = self._scale_embeddings(x)
        pre = self.w.norm_before
        # a lazy step of a pre-norm layer writes the normed input straight into the window (the only reader)
        into_window = pre and self._lazy(sel, x.shape[1])
        n = x.shape[0] * x.shape[1]
        # a many-token step of input thresholds: the norm zeroes the small channels of the q/k/v and gate/up input
        thr_attn = (layer, "attn_in") if pre and sel is not None and self._dense_input("attn_in", n) else None
        thr_ffn = (layer, "ffn_in") if pre and sel is not None and self._dense_input("ffn_in", n) else None
        h = self._norm(x, lw.norm1_w, lw.norm1_b, gi if into_window else None, thr_attn) if pre else x
        if lw.post_attn_norm_w is None:
            x = self._attention(layer, h, x, pos, positions, rope, sel, gi)  # the residual added inside
        else:  # Gemma-2: the sub-block's output alone (added into zeros), normed, then added
            x = self._add_normed(x, self._attention(layer, h, torch.zeros_like(x), pos, positions, rope, sel, gi),
                                 lw.post_attn_norm_w)
        if not pre:
            x = self._norm(x, lw.norm1_w, lw.norm1_b)
        h = self._norm(x, lw.norm2_w, lw.norm2_b, thresholded=thr_ffn) if pre else x
        if lw.post_ffn_norm_w is None:
            x = self._ffn(layer, h, x, sel, gi).view_as(x)  # the residual added inside
        else:
            x = self._add_normed(x, self._ffn(layer, h, torch.zeros_like(x), sel, gi).view_as(x), lw.post_ffn_norm_w)
        if not pre:
            x = self._norm(x, lw.norm2_w, lw.norm2_b)
        return x

    def _add_normed(self, x, y, weight):
        """x + RMSNorm(y) (Gemma-2's sandwich norms: a sub-block's output y (B, T, d) normed before the residual add),
        the norm rounded to the model dtype as the model's is; x keeps its dtype (fp32 in gated layers). The zeros the
        sub-block added y into cost one (B, T, d) pass: cheap next to the layer's weights, and every sub-block path
        (gathered, input-sparse, masked, dense) stays as it is."""
        return x + rms_norm(y, weight, self.w.eps, backend=self.cfg.backend, out_dtype=self.dtype).to(x.dtype)

    def _attention(self, layer, h, resid, pos, positions, rope, sel, gi):
        """h (B, T, d) the normed input (None: already in the input window), resid (B, T, d) the residual stream
        -> resid + attention(h)."""
        w = self.w
        B, T, d = resid.shape
        D, KV = w.head_dim, w.n_kv_heads
        gated = sel is not None and sel.heads is not None  # head gating through the gathered kernels
        masked = sel is not None and sel.masked  # many tokens: every head computed, unselected ones zeroed
        lazy = self._lazy(sel, T)
        if gi >= 0 and self.window is not None and h is not None:  # a dense fallback step too (lazy steps follow)
            self.window.write(gi, h)
        q, kv, heads = self._project_qkv(layer, h, rope, sel, gi, lazy, gated, B, T)
        J = heads.shape[0]
        q = q.view(B, -1, J, D)  # a strided view, read in place by the attention kernel; (B, W, J, D) if lazy
        if not lazy:
            k = kv[:, :KV * D].view(B, T, KV, D).transpose(1, 2)  # (B, KV, T, D)
            v = kv[:, KV * D:].view(B, T, KV, D).transpose(1, 2)
            self.cache.write(layer, positions, k, v)
        # OPT scales q (bias included) before attention in transformers; the same product, scaled in the kernel
        window = w.layer_windows[layer] if w.layer_windows else None  # a sliding-window layer's width
        if T > PREFILL_TOKENS and heads is self.all_heads:  # many tokens, every head in order: a fused SDPA kernel
            if window not in self._visible:  # one causal mask per window width for the step's layers
                self._visible[window] = causal_visible(positions, self.cache.keys.shape[3], window)
            a = prefill_attention(q, self.cache.keys[layer], self.cache.values[layer], pos, self.scale,
                                  self._visible[window], softcap=w.attn_softcap, window=window)
        else:  # lazy (q_slot): the new token's query is the window row of its slot
            a = decode_attention(q, self.cache.keys[layer], self.cache.values[layer], heads, pos, self.scale,
                                 w.n_heads, backend=self.cfg.backend, q_slot=self.window.slot if lazy else None,
                                 softcap=w.attn_softcap, window=window)  # (B, T, J, D)
        if gated and sel.head_keep is not None:
            a = a * sel.head_keep[gi].view(B, T, J, 1)
        if masked and sel.head_scores is not None:
            a = a * topk_mask(sel.head_scores[:, gi], self.k_heads, a.dtype).view(B, T, J, 1)
        return self._out_projection(layer, a.reshape(B * T, J * D), resid, sel, gi, gated, masked)

    def _project_qkv(self, layer, h, rope, sel, gi, lazy, gated, B, T):
        """The q/k/v projections of one layer's step (RoPE applied) -> q (rows, J*D) of the heads attended with,
        kv (B*T, 2*KV*D) the keys and values to cache (None when lazy: already written into the cache), and those
        heads (J,) int32: every head (self.all_heads), or the selected ones. Lazy: q has the window's B*W rows."""
        w, lw, be = self.w, self.w.layers[layer], self.cfg.backend
        D, KV = w.head_dim, w.n_kv_heads
        if lazy:
            # One GEMV over the window's W inputs reads the selected heads' q rows and the K/V rows of the selected
            # + refresh heads (each weight row once; the tokens are padded to 16 anyway). The new token's query is
            # the window row of its slot; the keys and values go straight into the cache.
            heads = sel.heads[gi]  # (Kh,)
            W, Kq = self.window.window, sel.head_rows.shape[1]
            out = row_linear(self.window.h[gi].view(B * W, -1), lw.qkv_w, sel.qkv_rows[gi], lw.qkv_b, backend=be,
                             out_dtype=torch.float32, **LAZY_QKV)  # (B*W, Kq + 2*(Kh + r)*D)
            self._head_norm_(out, lw.q_norm_w, heads.shape[0])  # Qwen3: q heads, then the keys of kv_heads
            self._head_norm_(out, lw.k_norm_w, sel.kv_heads.shape[1], Kq)
            if rope is not None:
                rope_(out, *self.window_rope[layer], heads.shape[0], D, W, backend=be)
            kv_window_write(out[:, Kq:], self.cache.keys[layer], self.cache.values[layer], sel.kv_heads[gi],
                            self.window.positions, self.layer_inv_freq[layer], backend=be)
            return out[:, :Kq], None, heads
        hf = h.reshape(B * T, -1)  # (n, d)
        if sel is not None and self._dense_input("attn_in", B * T):
            hf = self._premasked(layer, "attn_in", hf)  # then the dense q/k/v GEMM below
        elif sel is not None and self._thresholded("attn_in"):
            # only the rows of W_qkv.T whose input channel passes the threshold are read; q/k/v in the model dtype
            # (the cache's)
            qkv = self._sparse_in(layer, "attn_in", hf, self.t_qkv[layer], lw.qkv_b, out_dtype=self.dtype)
            self._head_norm_(qkv, lw.q_norm_w, w.n_heads)
            self._head_norm_(qkv, lw.k_norm_w, KV, self.n_q)
            if rope is not None:
                rope_(qkv, *rope, w.n_heads + KV, D, T, backend=be)
            return qkv[:, :self.n_q], qkv[:, self.n_q:], self.all_heads
        if gated:
            rows, heads = sel.head_rows[gi], sel.heads[gi]  # (Kh*D,), (Kh,)
            # q stays in the kernel's fp32 accumulator (no cast pass); the attention kernel reads it as is
            q = _chunked(lambda xs: row_linear(xs, lw.q_w(self.n_q), rows, lw.qkv_b, backend=be,
                                               out_dtype=torch.float32), hf)  # (n, Kh*D)
            kv = _linear(hf, lw.kv_w(self.n_q), None if lw.qkv_b is None else lw.qkv_b[self.n_q:])  # (n, 2*KV*D)
            self._head_norm_(q, lw.q_norm_w, heads.shape[0])
            self._head_norm_(kv, lw.k_norm_w, KV)
            if rope is not None:
                rope_(q, *rope, heads.shape[0], D, T, backend=be)
                rope_(kv, *rope, KV, D, T, backend=be)
            return q, kv, heads
        qkv = _linear(hf, lw.qkv_w, lw.qkv_b)  # (n, H*D + 2*KV*D): one GEMV
        self._head_norm_(qkv, lw.q_norm_w, w.n_heads)
        self._head_norm_(qkv, lw.k_norm_w, KV, self.n_q)
        if rope is not None:  # q and k heads are adjacent: one in-place pass over both
            rope_(qkv, *rope, w.n_heads + KV, D, T, backend=be)
        return qkv[:, :self.n_q], qkv[:, self.n_q:], self.all_heads

    def _out_projection(self, layer, a, resid, sel, gi, gated, masked):
        """a (B*T, J*D) the attention output of the attended heads, resid (B, T, d) -> resid + the out-projection
        of a (only the selected heads' rows of W_o when gated): added into the fp32 residual stream in place
        (returns resid), or a new tensor in the residual's dtype."""
        lw, be = self.w.layers[layer], self.cfg.backend
        B, T, d = resid.shape
        rf = resid.reshape(B * T, d)
        if sel is not None and self._dense_input("attn_out", B * T):  # zeroed in one kernel, then the dense GEMM
            a = mask_input(a, self.teal.threshold(layer, "attn_out"), self.teal.counter(layer, "attn_out"),
                           out_dtype=self.dtype, backend=be)
            y = _add_linear(rf, a, lw.o_w, lw.o_b, self.resid32)
            return resid if self.resid32 else y.view(B, T, d)
        if sel is not None and self._thresholded("attn_out"):  # the rows of W_o.T of the kept channels
            a = a.to(self.dtype)  # the o projection's input as the model computes it (the threshold's units)
            if self.resid32:
                self._sparse_in(layer, "attn_out", a, lw.o_t, lw.o_b, out=rf)
                return resid
            return self._sparse_in(layer, "attn_out", a, lw.o_t, lw.o_b, residual=rf).view(B, T, d)
        if masked and self.resid32:  # cuBLAS for the many tokens, added into the fp32 residual stream
            rf.add_(_linear(a.to(lw.o_w.dtype), lw.o_w, lw.o_b))
            return resid
        if sel is not None and self.resid32:
            # the fp32 residual stream: the out-projection adds into it (every head's rows if heads are not gated)
            o_rows = sel.head_rows[gi] if gated else self.all_q_rows
            for i in range(0, B * T, KERNEL_TOKENS):
                row_linear_t(a[i:i + KERNEL_TOKENS], lw.o_t, o_rows, lw.o_b, backend=be,
                             out=rf[i:i + KERNEL_TOKENS])
            return resid
        if gated:
            rows = sel.head_rows[gi]  # (Kh*D,) the selected heads' rows of W_o.T
            out = [row_linear_t(a[i:i + KERNEL_TOKENS], lw.o_t, rows, lw.o_b, backend=be,
                                residual=rf[i:i + KERNEL_TOKENS]) for i in range(0, B * T, KERNEL_TOKENS)]
            return (out[0] if len(out) == 1 else torch.cat(out)).view(B, T, d)
        return _residual_linear(rf, a.to(lw.o_w.dtype), lw.o_w, lw.o_b).view(B, T, d)

    def _ffn(self, layer, h, resid, sel, gi):
        """h (B, T, d) the normed input, resid (B, T, d) -> resid + ffn(h), (n, d)."""
        lw = self.w.layers[layer]
        hf = h.reshape(-1, h.shape[-1])  # (n, d)
        rf = resid.reshape(-1, h.shape[-1])
        into = sel is not None and self.resid32  # add into the fp32 residual stream rf, in place
        if self.w.experts:
            return self._ffn_moe(layer, hf, rf, sel, gi, into)
        if sel is not None and (self._thresholded("ffn_in") or self._thresholded("ffn_out")):
            return self._ffn_thresholded(layer, hf, rf, into)
        if sel is not None and isinstance(self.ffn_selector, VerifyFFNSelector):
            return self._ffn_verify(layer, hf, rf, into)
        if sel is not None and isinstance(self.ffn_selector, SketchThresholdFFNSelector):
            return self._ffn_scored(layer, hf, rf, into)
        idx, keep, mask = self._ffn_choice(layer, hf, sel, gi)
        if self.nm24 is not None:
            y = _chunked2(lambda a, b, i: self._ffn_24(layer, a, b, sel, gi, i, into, mask), hf, rf)
            return rf if into else y
        if mask is not None:  # the mask path on cuBLAS: every neuron computed, each token's others zeroed
            g = apply_act(_linear(hf, lw.w_in, lw.b_in), self.w.act)
            g = (g if lw.w_up is None else g * F.linear(hf, lw.w_up)) * mask
            return _add_linear(rf, g, lw.down_w, lw.b_out, into)
        if idx is not None:
            outs = []
            for t0 in range(0, hf.shape[0], KERNEL_TOKENS):
                t1 = t0 + KERNEL_TOKENS
                outs.append(gated_ffn(hf[t0:t1], lw.w_in, lw.down_t, idx, self.w.act, w_up=lw.w_up, b_in=lw.b_in,
                                      b_out=lw.b_out, keep=None if keep is None else keep[t0:t1],
                                      backend=self.cfg.backend, residual=None if into else rf[t0:t1],
                                      out=rf[t0:t1] if into else None))
            return rf if into else (torch.cat(outs) if len(outs) > 1 else outs[0])
        if lw.b_in is not None and self.w.act == "relu":  # OPT fc1: bias and ReLU in cuBLASLt's epilogue
            g = torch._addmm_activation(lw.b_in, hf, lw.w_in.t())
        else:
            g = apply_act(_linear(hf, lw.w_in, lw.b_in), self.w.act)  # (n, F)
        if lw.w_up is not None:
            g = g * F.linear(hf, lw.w_up)
        return _add_linear(rf, g, lw.down_w, lw.b_out, into)

    def _ffn_moe(self, layer, hf, rf, sel, gi, into: bool):
        """A mixture-of-experts FFN -> resid + ffn. The model's own router gives each token its k experts and their
        weights (the router's choice is not ours to change). Neuron e·F + f of the stacked experts (weights.py) is a
        candidate when expert e is routed; in a gated layer with scores (given, predicted, or the FFN selector's)
        each token keeps its top k_ffn candidates, else all of them. A kept neuron's activation is scaled by its
        expert's routing weight, so one gathered FFN over the kept neurons sums the weighted experts' outputs.
        Up to KERNEL_TOKENS rows: the union of the tokens' kept neurons read once (select.py), each token's own
        weights in keep (zero where it did not keep a neuron); more rows: every expert's neurons on cuBLAS, each
        token's others zeroed (the mask path's arithmetic; the routed compute alone would read the same weights)."""
        lw, w = self.w.layers[layer], self.w
        n, f_e = hf.shape[0], w.ffn // w.experts  # lw.w_in / lw.w_up: gate_up_proj in place (weights.py)
        _, top_w, top_e = lw.router(hf)  # (n, k) routing weights, (n, k) experts
        routed = hf.new_zeros(n, w.experts, dtype=torch.float32).scatter_(1, top_e, top_w.float())  # (n, E)
        weight = routed.repeat_interleave(f_e, dim=1)  # (n, E*F): each neuron's expert weight, 0 where not routed
        candidate = torch.zeros_like(routed, dtype=torch.bool).scatter_(1, top_e, True).repeat_interleave(f_e, dim=1)
        scores = None
        if sel is not None and self.sketch_reads_routed(top_e.numel()):  # the others score 0: not candidates
            scores = self.ffn_selector.scores(layer, hf, experts=top_e.flatten(), expert_rows=f_e)  # (n, E*F)
        elif sel is not None and self.ffn_selector is not None:
            scores = self.ffn_selector.scores(layer, hf)  # (n, E*F)
        elif sel is not None and sel.neuron_scores is not None:
            scores = sel.neuron_scores[:, gi]  # (n, E*F)
        k = w.active_ffn if scores is None else self.k_ffn
        ranked = (weight if scores is None else scores.float()).masked_fill(~candidate, float("-inf"))  # (n, E*F)
        if n > KERNEL_TOKENS:
            gu = F.linear(hf, lw.w_in).view(n, w.experts, 2, f_e)  # (n, E, 2, F): each expert's gate, then up
            a = (apply_act(gu[:, :, 0], w.act) * gu[:, :, 1]).reshape(n, w.ffn)  # (n, E*F) model dtype
            a = (a * (weight * topk_mask(ranked, k, torch.bool))).to(self.dtype)
            return _add_linear(rf, a, lw.down_w, None, into)
        idx, keep = select_units(ranked.unsqueeze(1), k, "union")  # (1, K) int32, (1, n, K) 0/1 or None
        idx = idx[0]
        factor = weight.gather(1, idx.long().expand(n, -1))  # (n, K) routing weight of each read neuron
        factor = factor if keep is None else factor * keep[0]
        kw = dict(out=rf) if into else dict(residual=rf)
        return gated_ffn(hf, lw.w_in, lw.down_t, idx, w.act, w_up=lw.w_up, keep=factor, backend=self.cfg.backend,
                         in_rows=moe_in_rows(idx, f_e), **kw)

    def _thresholded(self, name: str) -> bool:
        return self.teal is not None and self.teal.on(name)

    def _dense_input(self, name: str, rows: int) -> bool:
        """Whether a step of ``rows`` token rows thresholds input ``name`` where it is made and runs the dense GEMM
        (module docstring: "Input thresholds") rather than the input-sparse kernel."""
        return self._thresholded(name) and rows > self.cfg.sparse_input_tokens

    def _premasked(self, layer: int, name: str, h: torch.Tensor) -> torch.Tensor:
        """h (n, d), a projection input of a many-token step: the norm already zeroed it in a pre-norm layer
        (_layer), else one kernel does it here."""
        if self.w.norm_before:
            return h
        return mask_input(h, self.teal.threshold(layer, name), self.teal.counter(layer, name), out_dtype=self.dtype,
                          backend=self.cfg.backend)

    def _sparse_in(self, layer, name, x, w_t, b, **kw):
        """(x · [|x| > τ]) · w_t + b for one projection input of a gated layer (kernels/sparse_input.py), counting
        the kept channels on the device."""
        return input_sparse_linear(x, w_t, self.teal.threshold(layer, name), b, backend=self.cfg.backend,
                                   count=self.teal.counter(layer, name), **kw)

    def _ffn_thresholded(self, layer, hf, rf, into: bool):
        """The FFN under input thresholds (teal: ffn_in and ffn_out; threshold: ffn_out): gate/up (fc1) read only
        the rows of the kept input channels, down only the rows of the neurons whose |a| passes -> resid + ffn.
        a is rounded to the model dtype between the two, as the model computes it."""
        lw, F_ = self.w.layers[layer], self.w.ffn
        n = hf.shape[0]
        if self._dense_input("ffn_in", n):
            hf = self._premasked(layer, "ffn_in", hf)
        if self._thresholded("ffn_in") and not self._dense_input("ffn_in", n):
            # gate/up stay in the kernel's fp32 accumulator; a is rounded to the model dtype where it is made
            gu = self._sparse_in(layer, "ffn_in", hf, self.t_fcin[layer], self.b_fcin[layer],
                                 out_dtype=torch.float32)
            g, u = gu[:, :F_], (gu[:, F_:] if lw.w_up is not None else None)  # (n, F) each
        else:
            g, u = _linear(hf, lw.w_in, lw.b_in), (None if lw.w_up is None else F.linear(hf, lw.w_up))
        if self._dense_input("ffn_out", n):  # act(g) * u zeroed in one kernel, then the dense down GEMM
            a = act_mask_input(g, u, self.w.act, self.teal.threshold(layer, "ffn_out"),
                               self.teal.counter(layer, "ffn_out"), dtype=self.dtype, backend=self.cfg.backend)
            return _add_linear(rf, a, lw.down_w, lw.b_out, into)
        if self._thresholded("ffn_out"):
            # act(g) * u, the channel lists of the down projection's input and the down rows of the kept neurons:
            # one compaction kernel computes a, then one GEMV (kernels/sparse_input.act_input_sparse_linear)
            kw = dict(backend=self.cfg.backend, count=self.teal.counter(layer, "ffn_out"), dtype=self.dtype)
            kw.update(out=rf) if into else kw.update(residual=rf)
            return act_input_sparse_linear(g, u, self.w.act, lw.down_t, self.teal.threshold(layer, "ffn_out"),
                                           lw.b_out, **kw)
        a = apply_act(g.to(self.dtype), self.w.act)
        a = a if u is None else a * u.to(self.dtype)  # (n, F) model dtype
        return _add_linear(rf, a, lw.down_w, lw.b_out, into)

    def _ffn_verify(self, layer, hf, rf, into: bool):
        """Propose, then verify (ffn_select.VerifyFFNSelector) -> resid + ffn. Up to KERNEL_TOKENS rows: gate/up rows
        of the candidates (one token's, or the union of the step's), each token's top k of its own candidates by
        |a|, the down rows of the kept ones times those a; more rows: every neuron on cuBLAS, each token's
        candidates and keep set as masks (the mask path itself)."""
        lw, v, dt, be = self.w.layers[layer], self.ffn_selector, self.dtype, self.cfg.backend
        n, k = hf.shape[0], self.k_ffn
        kc = v.k_candidates(self.w.ffn, k)
        if n > KERNEL_TOKENS:
            cand = topk_mask(v.proposer.scores(layer, hf), kc, torch.bool)  # (n, F)
            a = apply_act(_linear(hf, lw.w_in, lw.b_in), self.w.act) * F.linear(hf, lw.w_up)  # (n, F) model dtype
            s = v.final_scores(layer, a).masked_fill(~cand, float("-inf"))
            a = a * topk_mask(s, k, a.dtype)
            return _add_linear(rf, a, lw.down_w, lw.b_out, into)
        if n == 1:  # one token: its own candidates, ascending
            cand, ckeep = v.proposer.topk(layer, hf, kc), None  # (Kc,)
        else:  # the union of the step's candidates; ckeep (n, Ku): whose candidate each one is
            cidx, ckeep = select_units(v.proposer.scores(layer, hf).unsqueeze(1), kc, "union")
            cand, ckeep = cidx[0], None if ckeep is None else ckeep[0]
        g = row_linear(hf, lw.w_in, cand, lw.b_in, backend=be, out_dtype=dt)  # (n, K) the candidates' gate
        a = (apply_act(g, self.w.act) * row_linear(hf, lw.w_up, cand, backend=be, out_dtype=dt)).to(dt)
        s = v.final_scores(layer, a, cand)
        if ckeep is not None:
            s = s.masked_fill(ckeep == 0, float("-inf"))
        if n == 1:  # the down rows of the kept neurons only
            pos = topk_indices(s, k, backend=be)[0].long()  # (k,) positions in cand, ascending (s >= 0: |a|)
            a, rows = a[:, pos], cand[pos]
        else:  # the union's rows; each token's others zeroed
            a, rows = a * topk_mask(s, k, a.dtype), cand
        if into:
            return row_linear_t(a, lw.down_t, rows, lw.b_out, backend=be, out=rf)
        return row_linear_t(a, lw.down_t, rows, lw.b_out, backend=be, residual=rf)

    def _ffn_scored(self, layer, hf, rf, into: bool):
        """sketch_threshold (ffn_select.SketchThresholdFFNSelector) -> resid + ffn. Up to KERNEL_TOKENS rows: the
        sketch scores every neuron, one kernel computes a = act(gate)·up reading only the gate/up rows of the
        neurons whose estimate passes the layer's threshold (zeros elsewhere), and the input-sparse GEMV reads the
        down rows of the nonzero a (threshold 0). More rows: every neuron on cuBLAS, each token's others zeroed."""
        lw, sel, be = self.w.layers[layer], self.ffn_selector, self.cfg.backend
        if hf.shape[0] > KERNEL_TOKENS:
            keep = sel.keep(layer, hf)  # (n, F) bool, counted
            a = apply_act(_linear(hf, lw.w_in, lw.b_in), self.w.act)
            a = (a if lw.w_up is None else a * F.linear(hf, lw.w_up)) * keep.to(self.dtype)
            return _add_linear(rf, a, lw.down_w, lw.b_out, into)
        a = scored_ffn_in(hf, lw.w_in, sel.scores(layer, hf), sel.threshold(layer), self.w.act, w_up=lw.w_up,
                          b_in=lw.b_in, count=sel.counter(layer), out_dtype=self.dtype, backend=be)  # (n, F)
        kw = dict(out=rf) if into else dict(residual=rf)
        return input_sparse_linear(a, lw.down_t, self.zero_threshold, lw.b_out, backend=be, **kw)

    def _ffn_choice(self, layer, hf, sel, gi):
        """This gated layer's FFN choice -> (idx (K,) int32, keep (n, K) or None, None) for the gathered kernels, or
        (None, None, mask (n, F) 0/1) for a masked (many-token) step, or (None, None, None): every neuron."""
        if sel is None:
            return None, None, None
        if self.ffn_selector is not None:  # decided here, from this layer's own FFN input
            if hf.shape[0] == 1 and not sel.masked:  # one token: its own top k, scored and chosen on the device
                return self.ffn_selector.topk(layer, hf, self.k_ffn), None, None
            scores = self.ffn_selector.scores(layer, hf)  # (n, F) fp32
            if sel.masked:
                return None, None, topk_mask(scores, self.k_ffn, self.dtype)
            idx, keep = select_units(scores.unsqueeze(1), self.k_ffn, self.cfg.batch_set)  # (1, K), (1, n, K)
            return idx[0], None if keep is None else keep[0].to(self.dtype), None
        if sel.masked and sel.neuron_scores is not None:
            return None, None, topk_mask(sel.neuron_scores[:, gi], self.k_ffn, self.dtype)  # the mask path's top-k
        if sel.ffn_idx is not None:
            return sel.ffn_idx[gi], None if sel.ffn_keep is None else sel.ffn_keep[gi], None
        return None, None, None

    def _ffn_24(self, layer, hf, rf, sel, gi, row0, into, mask=None):
        """The FFN over 2:4-compressed weights, reading only the selected neurons' compressed rows (<= 16 rows).
        into: add into the fp32 residual stream rf in place (module docstring); mask (n, F): a masked step's
        per-token 0/1 over every neuron."""
        lw, (v_in, m_in), up, (v_d, m_d) = self.w.layers[layer], *self.nm24[layer]
        be = self.cfg.backend
        gated = sel is not None and sel.ffn_idx is not None
        idx = sel.ffn_idx[gi] if gated else self.all_neurons
        g = nm24_linear(hf, v_in, m_in, idx, lw.b_in, backend=be, act=self.w.act, up=up)  # (n, K): act(.)·up
        if gated and sel.ffn_keep is not None:
            g = g * sel.ffn_keep[gi][row0:row0 + hf.shape[0]]
        if mask is not None:
            g = g * mask[row0:row0 + hf.shape[0]]
        if into:
            return nm24_linear_t(g, v_d, m_d, idx, bias=lw.b_out, out=rf, backend=be)
        return nm24_linear_t(g, v_d, m_d, idx, residual=rf, bias=lw.b_out, backend=be)


def _compress_ffn(lw):
    """Magnitude 2:4 of gate/up (fc1) along d and of the transposed down projection along d, compressed."""
    up = None if lw.w_up is None else compress_24(prune_24(lw.w_up))
    return compress_24(prune_24(lw.w_in)), up, compress_24(prune_24(lw.down_t))


def _chunked2(fn, x, r):
    """fn(x rows, r rows, first row index) over <= 16-row chunks of x (n, d) and r (n, d)."""
    if x.shape[0] <= KERNEL_TOKENS:
        return fn(x, r, 0)
    return torch.cat([fn(x[i:i + KERNEL_TOKENS], r[i:i + KERNEL_TOKENS], i) for i in range(0, x.shape[0],
                                                                                          KERNEL_TOKENS)])


def _linear(x, w, b):
    """x (n, d) · w (N, d)ᵀ + b: one cuBLAS call with the bias fused (addmm)."""
    return F.linear(x, w) if b is None else torch.addmm(b, x, w.t())


def _add_linear(rf, x, w, b, into: bool):
    """rf + x · wᵀ (+ b): into the fp32 residual stream rf in place (into; returns rf), else a new tensor with the
    residual fused into cuBLAS (_residual_linear)."""
    return rf.add_(_linear(x, w, b)) if into else _residual_linear(rf, x, w, b)


def _residual_linear(resid, x, w, b):
    """resid + x · wᵀ (+ b): the residual enters cuBLAS as C (beta = 1), saving an add pass."""
    out = torch.addmm(resid, x, w.t())
    return out if b is None else out.add_(b)


def _chunked(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply a <=16-token kernel over the rows of x (n, ...)."""
    if x.shape[0] <= KERNEL_TOKENS:
        return fn(x)
    return torch.cat([fn(x[i:i + KERNEL_TOKENS]) for i in range(0, x.shape[0], KERNEL_TOKENS)])
