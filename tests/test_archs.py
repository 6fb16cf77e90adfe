"""Every registered family (shadowsparse.arch.ARCHS) through the mask path, on its tiny random model
(``random:<family>``, shadowsparse.llm.tiny_config): keep-all gating equals dense bit for bit and remove() restores
the model; 50% gating zeroes exactly half of the heads and neurons and counts it; each training-free selector's
mask equals a forward that reads only the kept weight rows and columns, with the kept set recomputed by hand;
TEAL, targets, static masks, LTE routing and the byte accounting; and the public registry (register_arch) with its
errors. README's supported list is the list FAMILIES below. Mixture-of-experts families (MOE) gate the neurons of
the experts each token is routed to: the hand computations route every token with the family's own router and read
the routed experts' rows of the fused 3-D expert weights.

The hand computations read the Hugging Face modules by their own names (raw_ffn, raw_o, hf_qkv: a fused gate_up split
as Phi-3's chunk(2), GPT-2's Conv1D read transposed, GPT-NeoX's per-head q/k/v), not through the ArchSpec they
check."""
from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from shadowsparse import ArchSpec, GatingConfig, PredictorConfig, SharedPredictor, StaticScores, TensorScores, \
    attach_gating, register_arch
from shadowsparse.accounting import decoder_linear_bytes, weight_bytes_skipped
from shadowsparse.arch import ARCHS, ModelView
from shadowsparse.errors import ConfigError
from shadowsparse.gating import n_keep
from shadowsparse.llm import LLMConfig, load_llm
from shadowsparse.quant import quantize_rows, x8_grid
from shadowsparse.selectors import get_selector
from shadowsparse.selectors.random import RandomScores
from shadowsparse.teal import TealThresholds, attach_teal
from shadowsparse.training_free import GateScores, ThresholdScores
from shadowsparse.verify import SketchThresholdScores, VerifyConfig, VerifyScores

FAMILIES = sorted(ARCHS)  # every registered family: a new registry row without a tiny config fails here
MOE = {"mixtral", "qwen3_moe", "olmoe"}
GLU = {"llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo2", "stablelm", "gemma", "gemma2", "gemma3_text", "phi3",
       *MOE}
LAYERS = (1, 2, 3)  # gated layers (first_layer=1: the predictor reads layer 0)
TOL = dict(rtol=1e-4, atol=1e-5)
_MODELS: dict = {}


def tiny(family: str) -> nn.Module:
    """The family's tiny model, built once per test session (tests that change weights build their own)."""
    if family not in _MODELS:
        _MODELS[family] = load_llm(LLMConfig(name=f"random:{family}", seed=0))[0]
    return _MODELS[family]


def ids(n=2, t=24, seed=0):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def hook_count(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


# -- the families' own module layouts (independent of shadowsparse.arch) ---------------------------------------------
def _lin(m, transposed=False):
    return (m.weight.T if transposed else m.weight), m.bias


def raw_ffn(family: str, layer: nn.Module) -> types.SimpleNamespace:
    """gate (F, d) | None, fc1/up (F, d), down (d, F), their biases, the activation and the modules whose input and
    output are the FFN's, read from the Hugging Face layer by its own attribute names."""
    ns = types.SimpleNamespace(gate=None, b_gate=None, router=None)
    if family in MOE:  # every expert's rows on one axis: neuron e*F + f is neuron f of expert e
        m = layer.mlp
        gu, down = m.experts.gate_up_proj, m.experts.down_proj  # (E, 2F, d), (E, d, F): transformers' Parameters
        E, two_f, dm = gu.shape
        ns.expert_size = two_f // 2
        ns.gate, ns.up = (gu[:, half].reshape(-1, dm) for half in (slice(0, two_f // 2), slice(two_f // 2, None)))
        ns.down, ns.b_up, ns.b_down = down.permute(1, 0, 2).reshape(dm, -1), None, None
        ns.act, ns.first, ns.last, ns.router = m.experts.act_fn, m, m, m.gate  # the block's input and output
    elif family in GLU - {"phi3"}:
        m = layer.mlp
        (ns.gate, ns.b_gate), (ns.up, ns.b_up), (ns.down, ns.b_down) = _lin(m.gate_proj), _lin(m.up_proj), \
            _lin(m.down_proj)
        ns.act, ns.first, ns.last = m.act_fn, m.gate_proj, m.down_proj
    elif family == "phi3":
        m = layer.mlp
        ns.gate, ns.up = m.gate_up_proj.weight.chunk(2, 0)  # Phi3MLP: gate, up = gate_up_proj(x).chunk(2, -1)
        ns.b_up = None
        ns.down, ns.b_down = _lin(m.down_proj)
        ns.act, ns.first, ns.last = m.activation_fn, m.gate_up_proj, m.down_proj
    elif family == "opt":  # fc1/fc2 on the layer itself, tokens flattened
        (ns.up, ns.b_up), (ns.down, ns.b_down) = _lin(layer.fc1), _lin(layer.fc2)
        ns.act, ns.first, ns.last = layer.activation_fn, layer.fc1, layer.fc2
    elif family in ("gpt_neox", "falcon"):
        m = layer.mlp
        (ns.up, ns.b_up), (ns.down, ns.b_down) = _lin(m.dense_h_to_4h), _lin(m.dense_4h_to_h)
        ns.act, ns.first, ns.last = m.act, m.dense_h_to_4h, m.dense_4h_to_h
    elif family == "gpt2":  # Conv1D: weight (in, out)
        m = layer.mlp
        (ns.up, ns.b_up), (ns.down, ns.b_down) = _lin(m.c_fc, True), _lin(m.c_proj, True)
        ns.act, ns.first, ns.last = m.act, m.c_fc, m.c_proj
    else:
        raise AssertionError(f"no hand layout for '{family}': add it to raw_ffn of tests/test_archs.py")
    return ns


def raw_o(family: str, layer: nn.Module) -> tuple[nn.Module, torch.Tensor, torch.Tensor | None]:
    """The attention out-projection, its weight as (d_model, H*D) and its bias."""
    m = {"opt": lambda: layer.self_attn.out_proj, "gpt_neox": lambda: layer.attention.dense,
         "falcon": lambda: layer.self_attention.dense, "gpt2": lambda: layer.attn.c_proj}.get(
        family, lambda: layer.self_attn.o_proj)()
    return m, (m.weight.T if family == "gpt2" else m.weight), m.bias


def routing(raw, x: torch.Tensor) -> torch.Tensor | None:
    """MoE: (N, E*F) the router weight of each neuron's expert for each token of x (N, d), 0 where the token is not
    routed to it, as the family's own router computes it; None for a dense FFN."""
    if raw.router is None:
        return None
    _, weights, experts = raw.router(x)  # (N, k) each
    per_expert = torch.zeros(x.shape[0], raw.up.shape[0] // raw.expert_size).scatter_(1, experts, weights.float())
    return per_expert.repeat_interleave(raw.expert_size, dim=1)


def routed_only(scores: torch.Tensor, raw, x: torch.Tensor) -> torch.Tensor:
    """Scores (N, F) of the neurons a token does not compute (MoE) set to -inf: what a top-k may not pick."""
    w = routing(raw, x)
    return scores if w is None else scores.float().masked_fill(w == 0, float("-inf"))


def hand_ffn(raw, x: torch.Tensor, keep: torch.Tensor | None = None, keep_in: torch.Tensor | None = None):
    """The FFN of tokens x (N, d) computed per token from only the weight rows of its kept neurons (keep (N, F)
    bool; None: all) and the weight columns of its kept input channels (keep_in (N, d), TEAL). MoE: only the
    routed experts' neurons, each output scaled by its expert's router weight (the router reads x before TEAL).
    -> (output (N, d), activation (N, F) of the kept neurons, zero elsewhere)."""
    F = raw.up.shape[0]
    route = routing(raw, x)
    outs, acts = [], []
    for j, xt in enumerate(x):
        on = torch.ones(F, dtype=torch.bool) if route is None else route[j] > 0
        n = ((keep[j].bool() if keep is not None else torch.ones(F, dtype=torch.bool)) & on).nonzero().squeeze(1)
        c = keep_in[j].nonzero().squeeze(1) if keep_in is not None else torch.arange(x.shape[1])

        def rows(w, b):  # the kept neurons' rows, reading only the kept input channels
            return xt[c] @ w[n][:, c].T + (b[n] if b is not None else 0)
        h = rows(raw.up, raw.b_up)
        a = raw.act(rows(raw.gate, raw.b_gate)) * h if raw.gate is not None else raw.act(h)
        full = torch.zeros(F, dtype=x.dtype)
        full[n] = a
        acts.append(full)
        scale = a if route is None else a * route[j, n]
        outs.append(scale @ raw.down[:, n].T + (raw.b_down if raw.b_down is not None else 0))
    return torch.stack(outs), torch.stack(acts)


def hand_heads(x: torch.Tensor, w_o: torch.Tensor, b_o, keep: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The out-projection of tokens x (N, H*D) reading only the columns of each token's kept heads (keep (N, H))."""
    D = x.shape[1] // n_heads
    out = []
    for xt, kt in zip(x, keep):
        cols = kt.repeat_interleave(D).nonzero().squeeze(1)  # the kept heads' D channels each (may be none)
        out.append(xt[cols] @ w_o[:, cols].T + (b_o if b_o is not None else 0))
    return torch.stack(out)


def contribution(x: torch.Tensor, w_o: torch.Tensor, n_heads: int) -> torch.Tensor:
    """‖W_o[:, h] x_h‖ per token and head, by a loop over heads: (N, H*D) -> (N, H)."""
    D = x.shape[1] // n_heads
    return torch.stack([(x[:, h * D:(h + 1) * D] @ w_o[:, h * D:(h + 1) * D].T).norm(dim=-1) for h in range(n_heads)],
                       1)


def assert_top(keep: torch.Tensor, scores: torch.Tensor, k: int | None = None) -> None:
    """keep (N, U) bool is a top-k of scores (N, U) per row: k of them, none scoring below a dropped one (beyond
    float noise: the model and the hand computation sum in other orders)."""
    if k is not None:
        assert keep.sum(-1).eq(k).all(), keep.sum(-1)
    lo = scores.masked_fill(~keep, float("inf")).amin(-1)
    hi = scores.masked_fill(keep, float("-inf")).amax(-1)
    assert (lo >= hi - 1e-5 * scores.abs().amax()).all(), (lo - hi).min()


class Probe:
    """Records, per layer, what the hand computations need: the FFN input (before any gating hook), the FFN output,
    the out-projection's input before gating and its output, and the input of layer 1 (the predictor's feature)."""

    def __init__(self, family: str, model: nn.Module):
        self.view = ModelView(model)
        self.rec: dict = {}
        self.handles = []
        for i in range(self.view.dims.n_layers):
            layer = self.view.layer(i)
            raw = raw_ffn(family, layer)
            o = raw_o(family, layer)[0]
            self._on(raw.first, "pre", ("x", i))
            self._on(raw.last, "out", ("y", i))
            self._on(o, "pre", ("o_in", i))
            self._on(o, "out", ("o_out", i))
        self.handles.append(self.view.layer(1).register_forward_pre_hook(
            lambda m, a, kw: self.rec.__setitem__("h1", (a[0] if a else kw["hidden_states"]).detach()),
            with_kwargs=True))

    def _on(self, module, when, key):
        def put(t):
            # (N, .): OPT flattens tokens, the rest do not; a copy, since Falcon adds attention into its MLP's output
            # in place
            self.rec[key] = t.detach().reshape(-1, t.shape[-1]).clone()
        if when == "pre":
            self.handles.append(module.register_forward_pre_hook(lambda m, a: put(a[0])))
        else:
            self.handles.append(module.register_forward_hook(lambda m, a, out: put(out)))

    def remove(self):
        for h in self.handles:
            h.remove()


def record_masks(handle) -> dict:
    """(kind, layer) -> the 0/1 mask the gating hooks applied, expanded to (N, units)."""
    masks: dict = {}
    apply = handle._mask

    def recording(kind, layer, x):
        m = apply(kind, layer, x)
        units = m.shape[-1]
        masks[kind, layer] = m.expand(*x.shape[:-1], units).reshape(-1, units).bool()
        return m
    handle._mask = recording  # the hooks look _mask up at call time
    return masks


# -- keep-all, remove, 50% -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_keep_all_is_dense_bit_for_bit_and_remove_restores(family):
    model = tiny(family)
    view = ModelView(model)
    d = view.dims
    x = ids()
    dense = model(input_ids=x).logits
    before = hook_count(model)
    with attach_gating(model, StaticScores(torch.rand(d.n_layers, d.n_heads), torch.rand(d.n_layers, d.ffn)),
                       GatingConfig(ffn_sparsity=0.0, head_sparsity=0.0)):
        assert hook_count(model) == before  # nothing to skip: no hook at all
        assert torch.equal(model(input_ids=x).logits, dense)
    src = TensorScores(torch.randn(*x.shape, d.n_layers, d.n_heads), torch.randn(*x.shape, d.n_layers, d.ffn))
    with attach_gating(model, src, GatingConfig(ffn_sparsity=0.5, head_sparsity=0.5, first_layer=0)) as h:
        assert hook_count(model) == before + 2 * d.n_layers
        h.k_heads, h.k_neurons = d.n_heads, d.ffn  # the hooks run, told to keep every unit
        assert torch.equal(model(input_ids=x).logits, dense)
        h.k_heads, h.k_neurons = n_keep(d.n_heads, 0.5), n_keep(d.active_ffn, 0.5)
        assert not torch.allclose(model(input_ids=x).logits, dense)  # and gating does change the output
    assert hook_count(model) == before
    assert torch.equal(model(input_ids=x).logits, dense)  # remove(): dense again, bit for bit


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_half_sparsity_zeroes_half_of_every_layer_and_counts_it(family):
    model = tiny(family)
    view = ModelView(model)
    d = view.dims
    g = torch.Generator().manual_seed(1)
    heads, neurons = torch.rand(d.n_layers, d.n_heads, generator=g), torch.rand(d.n_layers, d.ffn, generator=g)
    raw, gated = {}, {}
    probes = [view.ffn_down(i).register_forward_pre_hook(lambda m, a, i=i: raw.__setitem__(("n", i), a[0]))
              for i in LAYERS]
    probes += [view.ffn_down(i).register_forward_pre_hook(  # MoE: the neurons each token computes (N, E*F)
        lambda m, a, i=i: raw.__setitem__(("r", i), view.routed_neurons(i))) for i in LAYERS]
    probes += [view.attn_out(i).register_forward_pre_hook(lambda m, a, i=i: raw.__setitem__(("h", i), a[0]))
               for i in LAYERS]
    with attach_gating(model, StaticScores(heads, neurons), GatingConfig(0.5, 0.5, first_layer=1)) as h:
        probes += [view.ffn_down(i).register_forward_pre_hook(lambda m, a, i=i: gated.__setitem__(("n", i), a[0]))
                   for i in LAYERS]  # registered after the gating hooks: they see the gated inputs
        probes += [view.attn_out(i).register_forward_pre_hook(lambda m, a, i=i: gated.__setitem__(("h", i), a[0]))
                   for i in LAYERS]
        model(input_ids=ids())
        stats = h.stats()
    for p in probes:
        p.remove()
    kh, kn = n_keep(d.n_heads, 0.5), n_keep(d.active_ffn, 0.5)
    for i in LAYERS:
        keep_n = torch.zeros(d.ffn).index_fill_(0, neurons[i].topk(kn).indices, 1)  # by hand: the top half
        if raw["r", i] is not None:  # MoE: the top half of each token's routed neurons
            assert raw["r", i].sum(-1).eq(d.active_ffn).all()
            top = neurons[i].expand_as(raw["r", i]).masked_fill(~raw["r", i], float("-inf")).topk(kn).indices
            keep_n = torch.zeros(raw["r", i].shape).scatter_(1, top, 1)
        keep_h = torch.zeros(d.n_heads).index_fill_(0, heads[i].topk(kh).indices, 1).repeat_interleave(d.head_dim)
        assert torch.equal(gated["n", i], raw["n", i] * keep_n) and torch.equal(gated["h", i], raw["h", i] * keep_h)
    assert stats["realized_ffn_sparsity"] == pytest.approx(1 - kn / d.active_ffn, abs=1e-9)
    assert stats["realized_head_sparsity"] == pytest.approx(1 - kh / d.n_heads, abs=1e-9)
    assert stats["gated_layers"] == len(LAYERS)
    if d.n_kv_heads < d.n_heads:  # a kv head is off when its whole group is: counted from the same masks
        groups = [torch.zeros(d.n_heads).index_fill_(0, heads[i].topk(kh).indices, 1).view(d.n_kv_heads, -1)
                  .amax(-1) for i in LAYERS]
        off = float(sum((1 - gr).sum() for gr in groups)) / (len(LAYERS) * d.n_kv_heads)
        assert stats["realized_kv_group_sparsity"] == pytest.approx(off, abs=1e-9)


# -- every training-free selector against a hand-sliced forward --------------------------------------------------------
CALIB = ids(4, 24, seed=9)  # calibration windows of the threshold and TEAL selectors (never the evaluated ones)


def _source(name: str, model: nn.Module):
    """(ScoreSource, head sparsity) of a selector, built as its Selector (shadowsparse/selectors/) builds it; the
    FFN-only ones at head sparsity 0."""
    view = ModelView(model)
    d = view.dims
    if name == "random":
        return RandomScores(seed=0), 0.5
    if name == "static":
        g = torch.Generator().manual_seed(2)
        return StaticScores(torch.rand(d.n_layers, d.n_heads, generator=g),
                            torch.rand(d.n_layers, d.ffn, generator=g)), 0.5
    if name == "predictor":  # an untrained shared predictor reading the hidden state after layer 0
        torch.manual_seed(0)
        cfg = PredictorConfig(hidden=32, rank=4)
        return SharedPredictor(d.hidden, d.n_layers, d.n_heads, d.ffn, 0, cfg).eval(), 0.5
    if name == "threshold":
        return ThresholdScores.calibrate(model, CALIB), 0.5
    if name == "gate":
        return GateScores(), 0.0
    vcfg = VerifyConfig()  # 3-bit midrise sketch of gate and up, groups of 64 (d_model here)
    if name == "sketch_threshold":  # the same sketch, per-layer thresholds on its estimates
        return SketchThresholdScores.calibrate(model, CALIB, vcfg, first_layer=1), 0.0
    q = {"sketch": 0.5, "sketch_verify": 0.75, "gate_verify": 0.75}[name]
    return VerifyScores(q, None, "gate" if name == "gate_verify" else "sketch", sketch=vcfg), 0.0


SELECTORS = ["random", "static", "predictor", "threshold", "gate", "sketch", "sketch_threshold", "sketch_verify",
             "gate_verify"]
SKETCHED = ("sketch", "sketch_threshold", "sketch_verify")


@pytest.mark.parametrize("selector", SELECTORS)
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_selector_mask_path_equals_a_hand_sliced_forward(family, selector):
    """Per gated layer: the FFN (and out-projection) output under the selector's masks equals a forward that reads
    only the kept neurons' rows and columns (the kept heads' columns), and the kept set is what the selector ranks,
    recomputed from the raw weights. Gate-reading selectors on a plain FFN are refused with the reason."""
    model = tiny(family)
    view = ModelView(model)
    d = view.dims
    if selector in ("gate", *SKETCHED, "gate_verify") and family not in GLU:
        reason = get_selector(selector).skip_reason(types.SimpleNamespace(view=view))
        assert reason and "needs a gated FFN" in reason  # refused with the reason, never reading a wrong module
        with pytest.raises(ConfigError, match="gated FFN"):
            attach_gating(model, _source(selector, model)[0], GatingConfig(ffn_sparsity=0.5))
        return
    source, head_s = _source(selector, model)
    probe = Probe(family, model)
    try:
        with attach_gating(model, source, GatingConfig(0.5, head_s, first_layer=1)) as handle:
            masks = record_masks(handle)
            model(input_ids=ids())
            stats = handle.stats()
    finally:
        probe.remove()
    rec, k = probe.rec, n_keep(d.active_ffn, 0.5)
    for i in LAYERS:
        raw = raw_ffn(family, view.layer(i))
        x, keep = rec["x", i], masks["neurons", i]
        torch.testing.assert_close(rec["y", i], hand_ffn(raw, x, keep)[0], **TOL)  # = reading only the kept rows
        dense_a = hand_ffn(raw, x)[1]
        expected = _expected_neuron_scores(selector, source, raw, x, dense_a, rec, i, d.active_ffn)
        if selector in ("threshold", "sketch_threshold"):  # its own per-layer threshold, not a count
            thr = source._neuron_thr[i] if selector == "threshold" else source._thr[i]
            score = dense_a.abs() if selector == "threshold" else expected
            clear = ((score - thr).abs() > 1e-5) & (routed_only(score, raw, x) > float("-inf"))  # MoE: routed ones
            assert torch.equal(keep[clear].bool(), (score > thr)[clear])
        elif expected is not None:
            assert_top(keep, routed_only(expected, raw, x), k)
        else:
            assert keep.sum(-1).eq(k).all()
        if head_s:
            _check_heads(family, selector, source, view, rec, masks, i)
    if selector not in ("threshold", "sketch_threshold"):
        assert stats["realized_ffn_sparsity"] == pytest.approx(1 - k / d.active_ffn, abs=1e-9)


def _expected_neuron_scores(selector, source, raw, x, dense_a, rec, i, units):
    """What the selector ranks, recomputed by hand from the raw weights (None: random, nothing to recompute)."""
    if selector == "static":
        return source._neurons[i].expand_as(dense_a)
    if selector == "predictor":
        return source(rec["h1"])[1][:, :, i].reshape(dense_a.shape)
    if selector == "gate":
        return raw.act(x @ raw.gate.T).abs()
    if selector in (*SKETCHED, "gate_verify"):
        if selector == "gate_verify":
            est = raw.act(x @ raw.gate.T).abs()
        else:
            cfg = VerifyConfig()
            qg, qu = (quantize_rows(w, cfg.bits, cfg.group, cfg.quantizer) for w in (raw.gate, raw.up))
            xs = x8_grid(x, None, cfg.group) if cfg.x_bits else x  # int8 per group (no act order: midrise)
            est = (raw.act(xs @ qg.T) * (xs @ qu.T)).abs()
        if selector == "sketch_threshold":
            return est
        n_cand = max(n_keep(units, 0.5), round(source.q * units))  # units: the neurons a token computes
        if n_cand == n_keep(units, 0.5):
            return est  # nothing to verify: the proposal is the keep set
        cand = torch.zeros_like(est, dtype=torch.bool).scatter_(1, routed_only(est, raw, x).topk(n_cand).indices, True)
        return dense_a.abs().masked_fill(~cand, -1.0)  # verified: the top |a| among the candidates
    return None


def _check_heads(family, selector, source, view, rec, masks, i):
    d = view.dims
    o, w_o, b_o = raw_o(family, view.layer(i))
    keep = masks["heads", i]
    x = rec["o_in", i]
    torch.testing.assert_close(rec["o_out", i], hand_heads(x, w_o, b_o, keep, d.n_heads), **TOL)
    kh = n_keep(d.n_heads, 0.5)
    if selector == "static":
        assert_top(keep, source._heads[i].expand(keep.shape), kh)
    elif selector == "predictor":
        assert_top(keep, source(rec["h1"])[0][:, :, i].reshape(keep.shape), kh)
    elif selector == "threshold":
        norms, thr = contribution(x, w_o, d.n_heads), source._head_thr[i]
        clear = (norms - thr).abs() > 1e-5
        assert torch.equal(keep[clear], (norms > thr)[clear])
    else:
        assert keep.sum(-1).eq(kh).all()


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_oracle_keeps_the_dense_top_activations(family):
    """oracle: the activation criterion's scores of a dense pass (score_window), ranked per token — the top |a| of
    the dense activations and the top head contributions, recomputed by hand."""
    from shadowsparse.criteria import get_criterion
    from shadowsparse.targets import score_window
    model = tiny(family)
    view = ModelView(model)
    d, x = view.dims, ids()
    probe = Probe(family, model)
    try:
        model(input_ids=x)  # dense
        dense = dict(probe.rec)
        heads, neurons, _, _ = score_window(model, get_criterion("activation"), x, with_layer_inputs=False)
        with attach_gating(model, TensorScores(heads, neurons), GatingConfig(0.5, 0.5, first_layer=1)) as handle:
            masks = record_masks(handle)
            model(input_ids=x)
    finally:
        probe.remove()
    for i in LAYERS:
        raw = raw_ffn(family, view.layer(i))
        assert_top(masks["neurons", i], routed_only(hand_ffn(raw, dense["x", i])[1].abs(), raw, dense["x", i]),
                   n_keep(d.active_ffn, 0.5))
        _, w_o, b_o = raw_o(family, view.layer(i))
        assert_top(masks["heads", i], contribution(dense["o_in", i], w_o, d.n_heads), n_keep(d.n_heads, 0.5))
        torch.testing.assert_close(probe.rec["y", i], hand_ffn(raw, probe.rec["x", i], masks["neurons", i])[0], **TOL)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_teal_equals_a_forward_reading_only_kept_input_channels(family):
    model = tiny(family)
    view = ModelView(model)
    thresholds = TealThresholds.calibrate(model, CALIB)
    thr = thresholds.thresholds(0.5)
    probe = Probe(family, model)  # before TEAL's hooks: the raw FFN input
    try:
        with attach_teal(model, thresholds, 0.5, first_layer=1) as handle:
            model(input_ids=ids())
            stats, skipped = handle.stats(), handle.weight_bytes_skipped()
    finally:
        probe.remove()
    for i in LAYERS:
        raw = raw_ffn(family, view.layer(i))
        x = probe.rec["x", i]
        keep_in = x.abs() > thr["ffn_in", i]
        a = hand_ffn(raw, x, keep_in=keep_in)[1]
        keep_out = a.abs() > thr["ffn_out", i]
        y = hand_ffn(raw, x, keep=keep_out, keep_in=keep_in)[0]  # kept channels in, kept activations out
        torch.testing.assert_close(probe.rec["y", i], y, **TOL)
    for key in ("attn_in", "attn_out", "ffn_in", "ffn_out"):
        assert 0.1 < stats[f"realized_{key}_sparsity"] < 0.9, (key, stats)
    assert 0.0 < skipped < 0.5


# -- fused projections -------------------------------------------------------------------------------------------------
def hf_qkv(family: str, layer: nn.Module, x: torch.Tensor, cfg) -> tuple[torch.Tensor, ...]:
    """q (N, H*D), k, v (N, KV*D) as the family's own attention forward splits them (copied from transformers)."""
    H = cfg.num_attention_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    if family == "phi3":
        y = layer.self_attn.qkv_proj(x)
        kv = cfg.num_key_value_heads * D
        return y[:, :H * D], y[:, H * D:H * D + kv], y[:, H * D + kv:]
    if family == "gpt2":
        return layer.attn.c_attn(x).split(cfg.hidden_size, dim=-1)
    if family == "gpt_neox":  # view(..., H, 3D).chunk(3): q, k, v per head
        return tuple(t.flatten(-2) for t in layer.attention.query_key_value(x).view(-1, H, 3 * D).chunk(3, -1))
    if family == "falcon":
        y = layer.self_attention.query_key_value(x).view(x.shape[0], -1, D)
        if cfg.new_decoder_architecture:  # per kv group: its queries, then k, then v
            g = y.view(x.shape[0], cfg.num_kv_heads, -1, D)
            return g[:, :, :-2].flatten(1), g[:, :, -2].flatten(1), g[:, :, -1].flatten(1)
        q, k, v = y.split([H, 1, 1], dim=-2)  # multi-query
        return q.flatten(1), k.flatten(1), v.flatten(1)
    attn = layer.self_attn
    return attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)


LAYOUT = {"phi3": "fused", "gpt2": "fused", "gpt_neox": "grouped", "falcon": "fused"}  # the rest: separate


@pytest.mark.parametrize("family", FAMILIES + ["falcon-40b"])
@torch.no_grad()
def test_qkv_split_by_row_ranges_matches_the_family_forward(family):
    """ModelView.attn_in_weights: the q/k/v rows of a fused projection in head order (the rows a kernel skipping a
    head would not read) give what the family's own split gives; "falcon-40b": the grouped layout Falcon's config
    selects (new_decoder_architecture), through the function registered for it."""
    if family == "falcon-40b":
        from transformers import AutoModelForCausalLM, FalconConfig
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(FalconConfig(
            vocab_size=260, hidden_size=64, num_attention_heads=4, num_kv_heads=2, num_hidden_layers=2,
            new_decoder_architecture=True, bos_token_id=256, eos_token_id=256)).eval()
        family, layout = "falcon", "grouped"
    else:
        model, layout = tiny(family), LAYOUT.get(family, "separate")
    view = ModelView(model)
    assert view.spec.qkv == layout
    x = torch.randn(5, view.dims.hidden)
    got = view.attn_in_weights(0)
    for name, want in zip("qkv", hf_qkv(family, view.layer(0), x, model.config)):
        weight, bias = got[name]
        torch.testing.assert_close(x @ weight.T + (bias if bias is not None else 0), want, **TOL)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_ffn_rows_and_accounting_match_the_modules(family):
    model = tiny(family)
    view = ModelView(model)
    d = view.dims
    raw = raw_ffn(family, view.layer(0))
    rows = view.ffn_in_rows(0)
    assert torch.equal(rows[-1][0], raw.up) and (raw.gate is None or torch.equal(rows[0][0], raw.gate))
    assert torch.equal(view.weight(0, view.spec.ffn_down), raw.down)
    # every decoder linear counted once (Conv1D too): the 2-D weight Parameters of the layer's projections
    linears = [m for layer in view.layers for m in layer.modules()
               if isinstance(getattr(m, "weight", None), nn.Parameter) and m.weight.dim() == 2]
    total = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    if family in MOE:  # per token: the routed k of E experts' 3-D weights; the router (E, d) is not a projection
        experts = sum(p.numel() * p.element_size() for layer in view.layers
                      for p in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj))
        routers = sum(layer.mlp.gate.weight.numel() * layer.mlp.gate.weight.element_size() for layer in view.layers)
        total += experts * d.experts_per_token / d.experts - routers
    assert decoder_linear_bytes(view) == total
    # a neuron skipped before the FFN saves all of its FFN bytes; a head its q rows and o columns, a kv group its k/v
    ffn_bytes = sum(m.weight.numel() * m.weight.element_size() for layer in view.layers
                    for m in (raw_ffn(family, layer).first, raw_ffn(family, layer).last)) if family not in MOE else \
        experts * d.experts_per_token / d.experts
    if family in GLU - {"phi3"} - MOE:  # up: the FFN's third matrix (Phi-3's is fused into the first)
        ffn_bytes += sum(layer.mlp.up_proj.weight.numel() * layer.mlp.up_proj.weight.element_size()
                         for layer in view.layers)
    stats = {"realized_ffn_sparsity": 0.5, "realized_head_sparsity": 0.25, "realized_kv_group_sparsity": 0.5,
             "gated_layers": d.n_layers}
    kv = 0.5 if d.n_kv_heads < d.n_heads else 0.25  # MHA: each head owns its k/v rows
    attn = d.n_layers * d.head_dim * d.hidden * 4 * (0.25 * 2 * d.n_heads + kv * 2 * d.n_kv_heads)  # fp32: 4 B
    assert weight_bytes_skipped(view, "early", stats) == pytest.approx((0.5 * ffn_bytes + attn) / total, rel=1e-9)


# -- targets, static masks, LTE ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_targets_are_collected_and_equal_the_hand_scores(family, tmp_path):
    from shadowsparse.criteria import get_criterion
    from shadowsparse.targets import TargetsConfig, collect, load_targets, score_window
    model = tiny(family)
    view = ModelView(model)
    d, x = view.dims, ids(2, 16)
    out = collect(model, x, TargetsConfig(criterion="activation", score_dtype="float32", layer_inputs=False),
                  tmp_path / "t")
    _, t = load_targets(out, model, keys=("features", "heads", "neurons"))
    assert t["features"].shape == (32, d.hidden) and t["heads"].shape == (32, d.n_layers, d.n_heads)
    probe = Probe(family, model)
    try:
        with torch.no_grad():
            model(input_ids=x)
    finally:
        probe.remove()
    for i in range(d.n_layers):
        raw = raw_ffn(family, view.layer(i))
        torch.testing.assert_close(t["neurons"][:, i], hand_ffn(raw, probe.rec["x", i])[1].abs(), **TOL)
        _, w_o, _ = raw_o(family, view.layer(i))
        torch.testing.assert_close(t["heads"][:, i], contribution(probe.rec["o_in", i], w_o, d.n_heads), **TOL)
    heads, neurons, _, _ = score_window(model, get_criterion("plainact"), x)  # a backward through the family
    assert heads.shape == (2, 16, d.n_layers, d.n_heads) and torch.isfinite(neurons).all() and neurons.abs().sum() > 0


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_layer_by_layer_replay_equals_the_model(family):
    """Static masks calibrate layer by layer on recorded inputs: replaying every layer with its own recorded
    arguments (Gemma-2/3: sliding or global masks and RoPE per layer; GPT-2: positional ones) gives the model's own
    hidden states."""
    from shadowsparse.prune.sparsify import record_layer_calls, run_layer
    model = tiny(family)
    view = ModelView(model)
    x = ids()
    hidden = model(input_ids=x, output_hidden_states=True).hidden_states  # (L + 1) x (B, T, d)
    batches = record_layer_calls(model, view, x, batch_size=1)
    for i in range(view.dims.n_layers - 1):
        batches = run_layer(view.layer(i), i, batches)
        torch.testing.assert_close(torch.cat([h for h, _ in batches]).reshape(hidden[i + 1].shape), hidden[i + 1])


@pytest.mark.parametrize("family", FAMILIES)
def test_static_nm_masks_and_function_preserving_permutations(family):
    from shadowsparse.prune import SparsityConfig, sparsify_, squash_
    from shadowsparse.prune.patterns import nm_counts
    from shadowsparse.prune.sparsify import fold_neuron_perm_, permute_input_
    model = load_llm(LLMConfig(name=f"random:{family}", seed=0))[0]
    view = ModelView(model)
    x = ids()
    if family in MOE:
        return _static_masks_on_experts(model, view, x)
    with torch.no_grad():
        ref = model(input_ids=x).logits
        g = torch.Generator().manual_seed(0)
        for i in range(view.dims.n_layers):  # E-Sparse's shuffles: neurons folded, inputs gathered
            fold_neuron_perm_(view, i, torch.randperm(view.dims.ffn, generator=g))
            for path in view.spec.attn_in + view.spec.ffn_in:
                permute_input_(view.module(i, path), torch.randperm(view.dims.hidden, generator=g),
                               view.spec.transposed)
        torch.testing.assert_close(model(input_ids=x).logits, ref, rtol=1e-4, atol=1e-4)
        assert squash_(model) == view.dims.n_layers * (len(view.spec.attn_in) + len(view.spec.ffn_in))
        torch.testing.assert_close(model(input_ids=x).logits, ref, rtol=1e-4, atol=1e-4)
    report = sparsify_(model, SparsityConfig(metric="wanda", pattern="2:4", batch_size=2), ids(4, 16, seed=3))
    assert report["realized_weight_sparsity"] == pytest.approx(0.5, abs=1e-6)
    for layer in view.layers:
        for m in layer.modules():  # 2 of every 4 weights along each linear's *input* (Conv1D: its rows)
            if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2:
                w = m.weight if isinstance(m, nn.Linear) else m.weight.T
                assert (nm_counts(w, 4) == 2).all()
    assert torch.isfinite(model(input_ids=x).logits).all()


def _static_masks_on_experts(model, view, x):
    """An MoE model's static masks prune each expert's own matrices (moe.expert_paths): E-Sparse's permutations per
    expert keep the function, 2:4 Wanda holds in every expert's gate_up and down slice, and each expert's Wanda
    norms are over the tokens the router sent to it (a hand computation on layer 0, calibrated on the dense layer)."""
    from shadowsparse.moe import expert_paths, fold_expert_perm_
    from shadowsparse.prune import SparsityConfig, sparsify_, squash_
    from shadowsparse.prune.patterns import Pattern, keep_mask, nm_counts
    from shadowsparse.prune.sparsify import fold_neuron_perm_, permute_input_
    with pytest.raises(ConfigError, match=r"permuting FFN neurons along the E\*F axis .* per expert"):
        fold_neuron_perm_(view, 0, torch.arange(view.dims.ffn))
    experts = [view.module(i, view.spec.experts) for i in range(view.dims.n_layers)]
    E, Fe, d = experts[0].num_experts, experts[0].intermediate_dim, view.dims.hidden
    calib = ids(4, 16, seed=3)
    seen = []  # layer 0's experts module on the calibration windows: its input (N, d) and routed experts (N, k)
    handle = experts[0].register_forward_pre_hook(lambda m, a: seen.append((a[0].clone(), a[1].clone())))
    with torch.no_grad():
        model(input_ids=calib)
        handle.remove()
        ref = model(input_ids=x).logits
        g = torch.Generator().manual_seed(0)
        for ex in experts:
            for e in range(E):
                fold_expert_perm_(ex.expert_down[e], torch.randperm(Fe, generator=g))
                permute_input_(ex.expert_gate_up[e], torch.randperm(d, generator=g))
        torch.testing.assert_close(model(input_ids=x).logits, ref, rtol=1e-4, atol=1e-4)
        assert squash_(model) == view.dims.n_layers * E
        torch.testing.assert_close(model(input_ids=x).logits, ref, rtol=1e-4, atol=1e-4)
    dense_w = experts[0].gate_up_proj.detach().clone()  # (E, 2F, d)
    with pytest.raises(ConfigError, match="allocation=sensitivity needs each matrix's gradient"):
        sparsify_(model, SparsityConfig(metric="wanda", ratio=0.5, allocation="sensitivity"), calib)
    report = sparsify_(model, SparsityConfig(metric="wanda", pattern="2:4", batch_size=4), calib)
    assert report["realized_weight_sparsity"] == pytest.approx(0.5, abs=1e-6)
    assert report["per_kind"]["expert_gate_up"] == report["per_kind"]["expert_down"] == pytest.approx(0.5, abs=1e-6)
    assert len(expert_paths(view, 0)["down"]) == E
    for ex in experts:
        for e in range(E):
            assert (nm_counts(ex.gate_up_proj[e], 4) == 2).all() and (nm_counts(ex.down_proj[e], 4) == 2).all()
    hidden = torch.cat([h for h, _ in seen])  # (N, d)
    routed = torch.cat([k for _, k in seen])  # (N, k)
    for e in range(E):
        rows = hidden[(routed == e).any(-1)].double()
        norm = rows.pow(2).sum(0).sqrt().float()  # (d,): this expert's tokens only
        want = keep_mask(dense_w[e].abs().float() * norm[None, :], Pattern.parse("2:4", 0.5), 0.5, "row")
        assert torch.equal(experts[0].gate_up_proj[e] != 0, want & (dense_w[e] != 0))
    assert torch.isfinite(model(input_ids=x).logits).all()
    # one calibration token reaches k of the E experts: the others have no Hessian; their weights' magnitude decides
    fresh = load_llm(LLMConfig(name=f"random:{view.model.config.model_type}", seed=0))[0]
    report = sparsify_(fresh, SparsityConfig(metric="sparsegpt", pattern="2:4"), ids(1, 1, seed=4))
    assert report["per_kind"]["expert_down"] == pytest.approx(0.5, abs=1e-6)


def _lte_groups_inside_the_models_experts(model, view, layers):
    """MoE: LTE's groups of 8 are k-means clusters of each expert's own gate rows (none spans two experts); each
    token keeps the top half of the groups of its routed experts only, whole groups, counted against k*F."""
    from shadowsparse.lte import LTEScores, Routers, group_neurons
    d = view.dims
    width = d.ffn // d.experts
    groups = group_neurons(view, layers, 8, "cluster")  # (L, E*F)
    for row in groups:
        assert torch.bincount(row).tolist() == [8] * (d.ffn // 8)
        assert torch.equal(row // (width // 8), torch.arange(d.ffn) // width)  # a group lies in one expert
    torch.manual_seed(0)
    routers = Routers(d.hidden, d.ffn, layers, groups, 0.9)
    source = LTEScores(routers)
    raw = {}
    probes = [view.ffn_down(i).register_forward_pre_hook(  # the routed neurons, (N, E*F)
        lambda m, a, i=i: raw.__setitem__(i, view.routed_neurons(i).clone())) for i in layers]
    with attach_gating(model, source, GatingConfig(ffn_sparsity=0.5)) as handle:
        masks = record_masks(handle)
        model(input_ids=ids())
        assert handle.stats()["realized_ffn_sparsity"] == pytest.approx(0.5)
    for h in probes:
        h.remove()
    routed_groups = d.active_ffn // 8  # per token: its k experts' groups
    for j, i in enumerate(layers):
        kept = masks["neurons", i].reshape(-1, d.ffn).bool()  # (N, E*F)
        assert not (kept & ~raw[i]).any()  # never an unrouted neuron
        per_group = torch.zeros(kept.shape[0], routers.n_experts).index_add_(1, groups[j], kept.float())
        assert ((per_group == 0) | (per_group == 8)).all()  # whole groups
        assert (per_group == 8).sum(-1).eq(routed_groups // 2).all()  # half of each token's routed groups


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_lte_routes_whole_experts_of_gate_row_clusters(family):
    from shadowsparse.lte import LTEScores, Routers, group_neurons
    model = tiny(family)
    view = ModelView(model)
    layers = list(LAYERS)
    if family in MOE:
        return _lte_groups_inside_the_models_experts(model, view, layers)
    groups = group_neurons(view, layers, 8, "cluster")  # k-means of the gate (or fc1) rows, (F, d)
    for row in groups:
        assert torch.bincount(row).tolist() == [8] * (view.dims.ffn // 8)
    torch.manual_seed(0)
    routers = Routers(view.dims.hidden, view.dims.ffn, layers, groups, 0.9)
    with attach_gating(model, LTEScores(routers), GatingConfig(ffn_sparsity=0.5)) as handle:
        masks = record_masks(handle)
        model(input_ids=ids())
        assert handle.stats()["realized_ffn_sparsity"] == pytest.approx(0.5)
    for j, i in enumerate(layers):
        per_expert = torch.zeros(masks["neurons", i].shape[0], routers.n_experts).index_add_(
            1, groups[j], masks["neurons", i].float())
        assert ((per_expert == 0) | (per_expert == 8)).all()  # whole experts on or off


# -- the registry ------------------------------------------------------------------------------------------------------
@pytest.fixture
def registry():
    saved = dict(ARCHS)
    yield ARCHS
    ARCHS.clear()
    ARCHS.update(saved)


def _phi2():
    from transformers import AutoModelForCausalLM, PhiConfig
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(PhiConfig(
        vocab_size=260, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=64, bos_token_id=256, eos_token_id=256)).eval()


PHI2 = ArchSpec(family="phi", layers_path="model.layers", attn_out="self_attn.dense", ffn_down="mlp.fc2",
                ffn_in=("mlp.fc1",), attn_in=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), glu=False)


@torch.no_grad()
def test_an_unknown_family_is_refused_with_the_spec_to_write_then_registered_and_gated(registry):
    model = _phi2()
    with pytest.raises(ConfigError) as err:
        ModelView(model)
    msg = str(err.value)
    assert "\n" not in msg and "architecture 'phi' is not registered" in msg
    assert "register_arch('phi', ArchSpec(family='phi', layers_path=" in msg  # the call to write, with the fields
    assert "decoder layers are 'model.layers'" in msg and "self_attn.dense (64, 64)" in msg and "mlp.fc2" in msg
    register_arch("phi", PHI2)
    view = ModelView(model)
    d = view.dims
    x = ids(2, 16)
    dense = model(input_ids=x).logits
    with attach_gating(model, StaticScores(torch.rand(d.n_layers, d.n_heads), torch.rand(d.n_layers, d.ffn)),
                       GatingConfig(0.5, 0.5)) as h:
        assert not torch.allclose(model(input_ids=x).logits, dense)
        assert h.stats()["realized_ffn_sparsity"] == pytest.approx(0.5)
    assert torch.equal(model(input_ids=x).logits, dense)


@pytest.mark.parametrize("change,message", [
    (dict(attn_in=("self_attn.q_proj",)), r"qkv='separate' takes attn_in=\(q, k, v\)"),
    (dict(ffn_in="mlp.fc1"), r"ffn_in must be a non-empty tuple of dotted module paths"),
    (dict(glu=True), r"a gated FFN \(glu=True\) needs ffn_gate"),
    (dict(qkv="interleaved"), r"qkv must be one of \['fused', 'grouped', 'separate'\]"),
    (dict(gate_up="fused"), r"a plain FFN \(glu=False\) takes ffn_in=\(fc1,\), no ffn_gate and gate_up='separate'"),
    (dict(ffn_down="mlp/fc2"), r"ffn_down must be a dotted module path"),
    (dict(attn_out="self_attn.q_proj"), r"must be other modules than ffn_in / attn_in"),
])
def test_a_bad_spec_is_refused_at_registration(registry, change, message):
    from dataclasses import replace
    with pytest.raises(ConfigError, match=r"ArchSpec for 'phi' is invalid: .*" + message):
        register_arch("phi", replace(PHI2, **change))
    assert "phi" not in ARCHS


@pytest.mark.parametrize("change,message", [
    (dict(ffn_down="mlp.down_proj"), r"layer 0 has no module 'mlp.down_proj'; its decoder layers are 'model.layers'"),
    (dict(layers_path="transformer.h"), r"the model has no 'transformer.h' \(layers_path\)"),
    (dict(transposed=True), r"transposed=True but 'self_attn.dense' is an nn.Linear"),
    (dict(attn_in=("self_attn.q_proj",), qkv="fused"), r"'self_attn.q_proj' reads as \(64, 64\) \(out, in\) but the "
                                                        r"config's dimensions give \(192, 64\)"),
])
def test_a_spec_that_does_not_fit_the_model_is_refused_when_wrapped(registry, change, message):
    from dataclasses import replace
    register_arch("phi", replace(PHI2, **change))
    with pytest.raises(ConfigError, match=r"ArchSpec for 'phi'.*" + message):
        ModelView(_phi2())


def test_a_wrong_layout_for_phi3_is_caught_by_the_weights(registry):
    """Phi-3 registered as if it were Llama (separate gate/up): the fused gate_up_proj is not found, not misread."""
    register_arch("phi3", ARCHS["llama"])
    with pytest.raises(ConfigError, match="layer 0 has no module 'mlp.gate_proj'.*mlp.gate_up_proj \\(192, 64\\)"):
        ModelView(load_llm(LLMConfig(name="random:phi3"))[0])


def test_a_mixture_of_experts_layout_that_does_not_fit_one_neuron_axis_is_refused():
    """Qwen2-MoE runs a shared expert beside the routed ones (a second FFN per layer), Qwen3-MoE can mix dense
    layers in: refused with the reason, before any hook; a Mixtral checkpoint's config passes check_causal."""
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig
    from shadowsparse.llm import check_causal, tiny_config
    model = AutoModelForCausalLM.from_config(Qwen2MoeConfig(
        vocab_size=260, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_attention_heads=2,
        num_key_value_heads=1, num_hidden_layers=1, num_experts=4, shared_expert_intermediate_size=32,
        bos_token_id=256, eos_token_id=256))
    with pytest.raises(ConfigError, match=r"'qwen2_moe' is a mixture-of-experts model \(4 experts per layer\) that "
                                          r"shadowsparse does not gate: it has a shared expert.*Supported mixture-of-"
                                          r"experts families: mixtral, qwen3_moe, olmoe"):
        ModelView(model)
    with pytest.raises(ConfigError, match="shared expert"):
        check_causal(model.config, "Qwen/Qwen1.5-MoE-A2.7B")
    mixed = tiny_config("qwen3_moe")
    mixed.mlp_only_layers = [1]
    with pytest.raises(ConfigError, match="'qwen3_moe' cannot be gated: some of its layers are dense MLPs"):
        ModelView(AutoModelForCausalLM.from_config(mixed))
    check_causal(tiny_config("mixtral"), "mistralai/Mixtral-8x7B-v0.1")


def test_moe_experts_keep_transformers_parameters_and_route_as_the_router():
    """The experts module swapped in holds the same Parameter objects (state dict unchanged), and its outputs equal
    transformers' eager experts loop bit for bit."""
    model = load_llm(LLMConfig(name="random:mixtral", seed=0))[0]
    model.config._experts_implementation = "eager"
    x = ids()
    keys, params = list(model.state_dict()), {id(p) for p in model.parameters()}
    with torch.no_grad():
        eager = model(input_ids=x).logits
        view = ModelView(model)
        assert type(view.layer(0).mlp.experts).__name__ == "GateableExperts"
        assert list(model.state_dict()) == keys and {id(p) for p in model.parameters()} == params
        assert torch.equal(model(input_ids=x).logits, eager)
    d = view.dims
    assert (d.ffn, d.active_ffn, d.experts, d.experts_per_token) == (128, 64, 4, 2)


# -- README ------------------------------------------------------------------------------------------------------------
def _readme_section() -> str:
    from tests.conftest import ROOT
    text = (ROOT / "README.md").read_text()
    return text[text.index("## Model families"):text.index("## Outputs of a run")]


def test_the_readme_lists_exactly_the_families_tested_here():
    import re
    section = _readme_section()
    listed = section[section.index("Supported"):section.index("A family is one")]
    assert re.findall(r"`([a-z0-9_]+)`", listed.split("):", 1)[1]) == FAMILIES


def test_the_readme_register_arch_example_registers_a_working_spec(registry):
    section = _readme_section()
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "README.md", "exec"), {})
    assert ARCHS["phi"] == PHI2
    d = ModelView(_phi2()).dims
    assert (d.n_layers, d.n_heads, d.ffn) == (2, 4, 96)


@pytest.mark.parametrize("family,method,tol", [("gpt_neox", "teal", 0.05), ("stablelm", "sketch", 1e-6),
                                               ("olmoe", "sketch", 1e-6)])
def test_load_gated_serves_a_family_the_engine_does_not_on_the_mask_path(family, method, tol):
    """engine="auto": a family the decode engine does not serve (GPT-NeoX's parallel blocks, StableLM's LayerNorm
    and partial RoPE, OLMoE's q/k norms over whole projections) is refused by extract_weights, and load_gated runs
    the selector through the hooks instead of failing."""
    import shadowsparse as ss
    model, tok = load_llm(LLMConfig(name=f"random:{family}"))
    g = ss.load_gated(model, method=method, ffn_sparsity=0.5, tokenizer=tok, calib=CALIB)
    assert g.engine == "hooks"
    assert len(g.generate(["hello"], max_new_tokens=3)) == 1
    assert g.stats()["realized_ffn_sparsity"] == pytest.approx(0.5, abs=tol)  # teal: calibrated thresholds


def test_moe_byte_accounting_never_builds_the_dense_expert_copy(monkeypatch):
    """Bytes of an MoE model are counted on the experts' Parameters: the dense (d, E*F) layouts of moe._ExpertView
    (a copy of a layer's every expert: 0.94 GB of down projections per layer by Mixtral-8x7B's shapes) are never
    built for a dtype or a byte count."""
    from shadowsparse import moe
    from shadowsparse.accounting import ffn_element_size
    from shadowsparse.verify import sketch_bytes
    view = ModelView(tiny("mixtral"))
    monkeypatch.setattr(moe._ExpertView, "weight", property(lambda self: pytest.fail("dense expert copy built")))
    assert ffn_element_size(view) == 4
    d = view.dims
    assert sketch_bytes(view, 2, VerifyConfig(bits=3)) == int(2 * 2 * d.active_ffn * d.hidden * (3 + 16 / 64) / 16 * 4)
    stats = {"realized_ffn_sparsity": 0.5, "realized_head_sparsity": 0.0, "gated_layers": d.n_layers}
    assert 0 < weight_bytes_skipped(view, "early", stats) < 1
