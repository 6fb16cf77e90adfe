"""The decode engine against the model it was built from (dense) and against the mask path (gated).

CPU, fp32, tiny random llama / mistral / qwen2 / qwen3 / phi3 / gemma / gemma2 / gemma3_text / opt (norm weights
randomized where a test checks a family's norms: transformers initializes them to ones, or Gemma's to zeros).
Kernels: the torch fallbacks, and the Triton kernels under TRITON_INTERPRET=1 (conftest sets it on machines without
CUDA). On a GPU the same tests run the Triton kernels for real, plus the CUDA-graph twin of generate.
"""
import pytest
import torch

from shadowsparse import GatingConfig, PredictorConfig, SharedPredictor, TensorScores, attach_gating
from shadowsparse.errors import ConfigError
from shadowsparse.kernels import common as kernels_common
from shadowsparse.runtime import DecodeEngine, EngineConfig, GraphedDecoder, extract_weights, select_units

from tests.conftest import tiny_model

BACKENDS = ["torch"] + (["triton"] if kernels_common.triton is not None else [])
TOL = dict(rtol=1e-4, atol=1e-4)
# the Triton path runs on the GPU where there is one (fp32 through tl.dot may use tf32 there), else interpreted
TRITON_DEVICE, TRITON_TOL = ("cuda", dict(rtol=5e-3, atol=5e-3)) if torch.cuda.is_available() else ("cpu", TOL)


def _scores(model, B, S, seed=0):
    cfg = model.config
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    F_ = getattr(cfg, "intermediate_size", None) or cfg.ffn_dim
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, S, L, H, generator=g), torch.randn(B, S, L, F_, generator=g)


def token_ids(B, S, seed=0):
    return torch.randint(0, 256, (B, S), generator=torch.Generator().manual_seed(seed))


def engine_steps(engine, ids, chunks, heads=None, neurons=None):
    """Run the engine over ids in steps of the given sizes (a prefill step, then decode steps) -> (B, S, V)."""
    out, t = [], 0
    for n in chunks:
        sl = slice(t, t + n)
        out.append(engine.step(ids[:, sl], t, heads=None if heads is None else heads[:, sl],
                               neurons=None if neurons is None else neurons[:, sl]))
        t += n
    return torch.cat(out, 1)


CHUNKS = [5, 1, 1, 3, 1]  # prefill 5, then decode 1 token, 1, a 3-token step, 1
ENGINE_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text", "opt"]  # SUPPORTED


def random_norms(model, seed=0, scale=0.3):
    """Every norm weight (and LayerNorm bias) plus N(0, scale²) noise, in place: random models start them at ones
    (Gemma: zeros, its norms scale by 1 + w), which would hide a norm factor read wrongly, Qwen3's q/k norm weights
    included. Returns the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.add_(torch.randn(p.shape, generator=g).to(p.device, p.dtype) * scale)
    return model


def engine_model(family: str, seed: int = 0):
    """The engine tests' model: random_norms(tiny_model(family))."""
    return random_norms(tiny_model(family, seed=seed))


@pytest.mark.parametrize("family", ENGINE_FAMILIES)
def test_dense_engine_matches_model(family):
    model = engine_model(family)
    ids = token_ids(2, sum(CHUNKS))
    engine = DecodeEngine(extract_weights(model), batch=2, max_len=32)
    with torch.no_grad():
        ref = model(ids).logits
    torch.testing.assert_close(engine_steps(engine, ids, CHUNKS), ref, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sliding_window_layers_match_the_model_beyond_the_window(backend):
    """Mistral v0.1's sliding window on every layer, here 6 positions: a 20-token prefill step (above PREFILL_TOKENS:
    SDPA with the windowed mask) and decode steps far past the window (the decode kernel skips the keys before
    it), dense and gated, equal the model and its mask path; without the window they would not."""
    from shadowsparse.runtime.engine import PREFILL_TOKENS
    device, tol = (TRITON_DEVICE, TRITON_TOL) if backend == "triton" else ("cpu", TOL)
    model = random_norms(tiny_model("mistral")).to(device)
    model.config.sliding_window = 6  # transformers builds the sliding mask from the config at every forward
    w = extract_weights(model)
    assert w.layer_windows == [6] * model.config.num_hidden_layers
    chunks = [20, 1, 3, 1, 1]
    assert chunks[0] > PREFILL_TOKENS
    ids = token_ids(2, sum(chunks), seed=10).to(device)
    heads, neurons = (t.to(device) for t in _scores(model, 2, sum(chunks), seed=11))
    with torch.no_grad():
        dense_ref = model(ids).logits
    out = engine_steps(DecodeEngine(w, batch=2, max_len=32, config=EngineConfig(backend=backend)), ids, chunks)
    torch.testing.assert_close(out, dense_ref, **tol)
    cfg = EngineConfig(ffn_sparsity=0.5, head_sparsity=0.5, backend=backend)
    out = engine_steps(DecodeEngine(w, batch=2, max_len=32, config=cfg), ids, chunks, heads, neurons)
    with attach_gating(model, TensorScores(heads, neurons), GatingConfig(ffn_sparsity=0.5, head_sparsity=0.5)), \
            torch.no_grad():
        torch.testing.assert_close(out, model(ids).logits, **tol)
    model.config.sliding_window = None
    with torch.no_grad():
        assert (model(ids).logits - dense_ref).abs().max() > 1e-2  # the window changed the output: not vacuous


@pytest.mark.parametrize("family", ["llama", "opt", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch", [1, 2])
def test_gated_engine_matches_mask_path(family, backend, batch):
    """FFN 50% + heads 50%, per-token sets; several tokens per step read their union (exact per-token semantics).
    Qwen3: the gathered q heads and the dense K/V through the per-head q/k norms; Phi-3: the fused q/k/v and
    gate/up row views; Gemma: GeGLU (tanh gelu) in the gathered FFN kernels, 1 + w norms, head_dim 24 != d / H;
    Gemma-2: sandwich norms around gathered sub-blocks, soft-capped scores in the attention kernel, its own scale;
    Gemma-3: q/k norms of factor 1 + w on the gathered q heads, RoPE bases 1e4 / 1e6 on alternate layers."""
    device, tol = (TRITON_DEVICE, TRITON_TOL) if backend == "triton" else ("cpu", TOL)
    model = engine_model(family).to(device)
    S = sum(CHUNKS)
    ids = token_ids(batch, S, seed=1).to(device)
    heads, neurons = (t.to(device) for t in _scores(model, batch, S, seed=2))
    cfg = EngineConfig(ffn_sparsity=0.5, head_sparsity=0.5, backend=backend)
    engine = DecodeEngine(extract_weights(model), batch=batch, max_len=32, config=cfg)
    out = engine_steps(engine, ids, CHUNKS, heads, neurons)
    with attach_gating(model, TensorScores(heads, neurons), GatingConfig(ffn_sparsity=0.5, head_sparsity=0.5)), \
            torch.no_grad():
        ref = model(ids).logits
    torch.testing.assert_close(out, ref, **tol)
    with torch.no_grad():
        assert (model(ids).logits - ref).abs().max() > 1e-2  # gating changed the output: the check is not vacuous
    # the case the dense K/V exist for: a head skipped by an earlier token, selected by a later one
    top = heads.topk(engine.k_heads, dim=-1).indices
    chosen = torch.zeros_like(heads, dtype=torch.bool).scatter_(-1, top, True)  # (B, S, L, H)
    assert ((~chosen[:, :-1]).cumsum(1).bool() & chosen[:, 1:]).any()


def test_vote_sets_match_mask_path_with_those_sets():
    """batch_set='vote': one fixed-size set per step, shared by the step's tokens; equals the mask path given
    scores that select exactly that set for each of the step's tokens."""
    model = tiny_model("llama")
    B, S = 2, sum(CHUNKS)
    ids = token_ids(B, S, seed=3)
    heads, neurons = _scores(model, B, S, seed=4)
    engine = DecodeEngine(extract_weights(model), batch=B, max_len=32,
                          config=EngineConfig(ffn_sparsity=0.5, head_sparsity=0.5, batch_set="vote"))
    out = engine_steps(engine, ids, CHUNKS, heads, neurons)
    vh, vn = torch.zeros_like(heads), torch.zeros_like(neurons)  # 1 on the step's vote set
    t = 0
    for n in CHUNKS:
        for src, dst, k in ((heads, vh, engine.k_heads), (neurons, vn, engine.k_ffn)):
            idx, keep = select_units(src[:, t:t + n].flatten(0, 1), k, "vote")  # (L, k)
            assert keep is None and idx.shape[-1] == k
            dst[:, t:t + n].scatter_(-1, idx.long().expand(B, n, -1, -1), 1.0)
        t += n
    with attach_gating(model, TensorScores(vh, vn), GatingConfig(ffn_sparsity=0.5, head_sparsity=0.5)), \
            torch.no_grad():
        ref = model(ids).logits
    torch.testing.assert_close(out, ref, **TOL)


def _predictor(model, feature_layer=0, seed=0):
    cfg = model.config
    torch.manual_seed(seed)
    F_ = getattr(cfg, "intermediate_size", None) or cfg.ffn_dim
    return SharedPredictor(cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, F_, feature_layer,
                           PredictorConfig(hidden=32, depth=1, rank=8)).eval()


@pytest.mark.parametrize("family", ["llama", "mistral", "opt", "qwen3", "phi3", "gemma", "gemma2"])
def test_greedy_generation_matches_mask_path(family):
    """The predictor in the loop (after layer 0), FFN 50% + heads 50%, batch 2: token for token."""
    model = engine_model(family)
    pred = _predictor(model)
    ids = token_ids(2, 7, seed=5)
    engine = DecodeEngine(extract_weights(model), batch=2, max_len=32, predictor=pred,
                          config=EngineConfig(ffn_sparsity=0.5, head_sparsity=0.5))
    out = engine.generate(ids, 10)
    with attach_gating(model, pred, GatingConfig(ffn_sparsity=0.5, head_sparsity=0.5)), torch.no_grad():
        ref = model.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)


def test_predictor_engine_logits_match_mask_path():
    model = tiny_model("llama")
    pred = _predictor(model, feature_layer=1, seed=1)
    ids = token_ids(1, sum(CHUNKS), seed=6)
    engine = DecodeEngine(extract_weights(model), batch=1, max_len=32, predictor=pred,
                          config=EngineConfig(ffn_sparsity=0.7, head_sparsity=0.25))
    assert engine.first_layer == 2
    out = engine_steps(engine, ids, CHUNKS)
    with attach_gating(model, pred, GatingConfig(ffn_sparsity=0.7, head_sparsity=0.25)), torch.no_grad():
        ref = model(ids).logits
    torch.testing.assert_close(out, ref, **TOL)


def test_bad_input_names_the_fix():
    w = extract_weights(tiny_model("llama"))
    with pytest.raises(ConfigError, match="batch must be in 1..8"):
        DecodeEngine(w, batch=9, max_len=16)
    with pytest.raises(ConfigError, match=r"ffn_sparsity must be in \[0, 1\)"):
        DecodeEngine(w, batch=1, max_len=16, config=EngineConfig(ffn_sparsity=1.0))
    engine = DecodeEngine(w, batch=1, max_len=16, config=EngineConfig(head_sparsity=0.5))
    with pytest.raises(ConfigError, match="needs scores"):
        engine.step(token_ids(1, 1), 0)
    with pytest.raises(ConfigError, match="use prefill"):
        DecodeEngine(w, batch=1, max_len=16).step(token_ids(1, 65), 0)
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(ConfigError, match="decode engine supports"):
        extract_weights(gpt2)


def test_fused_phi3_weights_are_read_in_place():
    """Phi-3: qkv_proj is the engine's fused q/k/v as is, gate and up are row views of gate_up_proj (no copies);
    Gemma: its norms become 1 + w in fp32 and its embeddings are scaled by sqrt(d) in their dtype."""
    model = tiny_model("phi3")
    w, layer = extract_weights(model), model.model.layers[1]
    F_ = model.config.intermediate_size
    assert w.layers[1].qkv_w is layer.self_attn.qkv_proj.weight
    gate_up = layer.mlp.gate_up_proj.weight
    for t, rows in ((w.layers[1].w_in, gate_up[:F_]), (w.layers[1].w_up, gate_up[F_:])):
        assert t.data_ptr() == rows.data_ptr() and t.shape == rows.shape and t.is_contiguous()
    gemma = random_norms(tiny_model("gemma"))
    gw = extract_weights(gemma)
    assert gw.act == "gelu_tanh" and gw.lm_head is gw.embed and gw.head_dim == 24
    torch.testing.assert_close(gw.layers[0].norm1_w, 1 + gemma.model.layers[0].input_layernorm.weight, rtol=0, atol=0)
    assert gw.final_norm_w.dtype == torch.float32 and gw.embed_scale.item() == 8.0  # sqrt(64)
    assert extract_weights(tiny_model("qwen3")).layers[0].q_norm_w.shape == (16,)


def test_gemma3_reads_a_rope_per_layer_type():
    """Gemma-3's rope_parameters per layer type: its local layers rotate with base 1e4, its global ones with 1e6 (and
    a linear factor where the config gives one, as the 4B+ models do); q/k norm factors 1 + w in fp32."""
    model = engine_model("gemma3_text")
    w = extract_weights(model)
    assert w.layer_rope == [(1e4, 1.0), (1e6, 1.0), (1e4, 1.0), (1e6, 1.0)]
    assert w.layer_windows == [16, None, 16, None]
    torch.testing.assert_close(w.layers[0].q_norm_w, 1 + model.model.layers[0].self_attn.q_norm.weight, rtol=0,
                               atol=0)
    engine = DecodeEngine(w, batch=1, max_len=8)
    assert len({id(f) for f in engine.layer_inv_freq}) == 2
    model.config.rope_parameters["full_attention"] = {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0}
    assert extract_weights(model).layer_rope[1] == (1e6, 8.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gemma2_long_prefill_and_its_attributes(backend):
    """Gemma-2 read as the model computes it: query_pre_attn_scalar ** -0.5 as the score scale (not head_dim's),
    soft-caps 50 / 30, sandwich norm factors 1 + w, a 16-position window on its local layers only; a 24-token
    prefill step (above PREFILL_TOKENS: the explicit soft-capped attention, not SDPA) then decode steps past the
    window, dense and gated, against the model and its mask path."""
    from shadowsparse.runtime.engine import PREFILL_TOKENS
    device, tol = (TRITON_DEVICE, TRITON_TOL) if backend == "triton" else ("cpu", TOL)
    model = engine_model("gemma2").to(device)
    w = extract_weights(model)
    assert w.attn_scale == 256 ** -0.5 and (w.attn_softcap, w.logit_softcap) == (50.0, 30.0)
    assert w.act == "gelu_tanh" and w.layer_windows == [16, None, 16, None]
    torch.testing.assert_close(w.layers[1].post_ffn_norm_w, 1 + model.model.layers[1].post_feedforward_layernorm.weight,
                               rtol=0, atol=0)
    chunks = [24, 1, 2]
    assert chunks[0] > PREFILL_TOKENS
    ids = token_ids(2, sum(chunks), seed=8).to(device)
    heads, neurons = (t.to(device) for t in _scores(model, 2, sum(chunks), seed=9))
    with torch.no_grad():
        dense_ref = model(ids).logits
    engine = DecodeEngine(w, batch=2, max_len=32, config=EngineConfig(backend=backend))
    torch.testing.assert_close(engine_steps(engine, ids, chunks), dense_ref, **tol)
    cfg = EngineConfig(ffn_sparsity=0.5, head_sparsity=0.5, backend=backend)
    out = engine_steps(DecodeEngine(w, batch=2, max_len=32, config=cfg), ids, chunks, heads, neurons)
    with attach_gating(model, TensorScores(heads, neurons), GatingConfig(ffn_sparsity=0.5, head_sparsity=0.5)), \
            torch.no_grad():
        ref = model(ids).logits
    torch.testing.assert_close(out, ref, **tol)
    assert (ref - dense_ref).abs().max() > 1e-2


def test_engine_refuses_what_it_cannot_serve_and_names_the_fix():
    """What the engine would compute differently from the model is refused at extract_weights, with the fix."""
    model = tiny_model("phi3")
    model.config.rope_parameters = {**model.config.rope_parameters, "partial_rotary_factor": 0.75}
    with pytest.raises(ConfigError, match=r"partial_rotary_factor=0.75.*75% of each head.*use the mask path"):
        extract_weights(model)
    model.config.rope_parameters = {"rope_type": "longrope", "rope_theta": 10000.0}
    with pytest.raises(ConfigError, match="RoPE type 'longrope' is not implemented"):
        extract_weights(model)
    gemma = tiny_model("gemma")
    gemma.config.use_bidirectional_attention = True
    with pytest.raises(ConfigError, match="use_bidirectional_attention=True"):
        extract_weights(gemma)
    gemma.config.use_bidirectional_attention = None
    gemma.model.layers[0].self_attn.scaling = 0.5  # one layer's scale unlike the others'
    with pytest.raises(ConfigError, match="attention scales differ.*use the mask path"):
        extract_weights(gemma)
    with pytest.raises(ConfigError, match="decode engine supports .*not 'stablelm'.*mask path"):  # LayerNorm,
        extract_weights(tiny_model("stablelm"))  # partial RoPE
    model = tiny_model("mistral")
    model.config.layer_types = ["chunked_attention"] * model.config.num_hidden_layers
    model.config.sliding_window = 8
    with pytest.raises(ConfigError, match=r"layer types \['chunked_attention'\] are not implemented"):
        extract_weights(model)
    llama = tiny_model("llama")
    llama.config.hidden_act = "gelu_new"
    with pytest.raises(ConfigError, match="FFN activation 'gelu_new' is not supported"):
        extract_weights(llama)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_cuda_graph_generation_matches_eager(family):
    """On a GPU (fp16): the captured step decodes the same tokens as the eager engine, dense and gated."""
    model = tiny_model(family).to("cuda", torch.float16)
    pred = _predictor(model).to("cuda")
    ids = token_ids(2, 7, seed=7).cuda()
    w = extract_weights(model)
    for cfg in (EngineConfig(), EngineConfig(ffn_sparsity=0.5, head_sparsity=0.5)):
        eager = DecodeEngine(w, batch=2, max_len=32, config=cfg, predictor=pred).generate(ids, 12)
        graphed = GraphedDecoder(DecodeEngine(w, batch=2, max_len=32, config=cfg, predictor=pred)).generate(ids, 12)
        assert torch.equal(eager, graphed)


@pytest.mark.slow
def test_embedded_smollm2_engine_matches_model():
    """The real embedded SmolLM2-135M (GGUF, fp32, GQA 9/3 heads, tied embeddings): dense and gated engine against
    the model and its mask path. The GPU benchmark uses this model's exact shapes with random weights."""
    from shadowsparse.llm import LLMConfig, load_llm
    model, tok = load_llm(LLMConfig(name="embedded:smollm2"))
    ids = tok(["The quick brown fox jumps over the lazy dog, and then it ran away"], return_tensors="pt").input_ids
    ids = ids[:, :11]
    assert ids.shape[1] == 11
    S = 11
    w = extract_weights(model)
    with torch.no_grad():
        ref = model(ids).logits
    torch.testing.assert_close(engine_steps(DecodeEngine(w, 1, 32), ids, [8, 1, 2]),
                               ref, rtol=1e-3, atol=1e-3)
    heads, neurons = _scores(model, 1, S, seed=8)
    engine = DecodeEngine(w, 1, 32, config=EngineConfig(ffn_sparsity=0.5, head_sparsity=0.33))
    out = engine_steps(engine, ids, [8, 1, 2], heads, neurons)
    with attach_gating(model, TensorScores(heads, neurons), GatingConfig(ffn_sparsity=0.5, head_sparsity=0.33)), \
            torch.no_grad():
        ref = model(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)


CHUNKS_24 = [5, 1, 2]  # fewer steps: the interpreted 2:4 kernels are the slowest part of this file on a CPU


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_24_engine_matches_model_with_pruned_ffn(family, backend):
    """nm24=True: the engine's compressed 2:4 FFN (dense, and with 50% of the neurons per token, batch 2) equals the
    model whose FFN weights were pruned to the same 2:4 pattern (down's groups along its output dim), mask path."""
    import copy

    from shadowsparse.arch import ModelView
    from shadowsparse.kernels.nm24 import prune_24
    device, tol = (TRITON_DEVICE, TRITON_TOL) if backend == "triton" else ("cpu", TOL)
    model = tiny_model(family).to(device)
    pruned = copy.deepcopy(model)
    view = ModelView(pruned)
    names = ("mlp.gate_proj", "mlp.up_proj") if family == "llama" else ("fc1",)
    with torch.no_grad():
        for i in range(view.dims.n_layers):
            for name in names:
                m = view.module(i, name)
                m.weight.copy_(prune_24(m.weight))
            down = view.ffn_down(i)
            down.weight.copy_(prune_24(down.weight.t().contiguous()).t())
    ids = token_ids(2, sum(CHUNKS_24), seed=9).to(device)
    w = extract_weights(model)
    out = engine_steps(DecodeEngine(w, 2, 32, EngineConfig(nm24=True, backend=backend)), ids, CHUNKS_24)
    with torch.no_grad():
        ref = pruned(ids).logits
    torch.testing.assert_close(out, ref, **tol)
    heads, neurons = (t.to(device) for t in _scores(model, 2, sum(CHUNKS_24), seed=10))
    cfg = EngineConfig(nm24=True, ffn_sparsity=0.5, backend=backend)
    out = engine_steps(DecodeEngine(w, 2, 32, cfg), ids, CHUNKS_24, heads, neurons)
    with attach_gating(pruned, TensorScores(heads, neurons), GatingConfig(ffn_sparsity=0.5)), torch.no_grad():
        ref = pruned(ids).logits
    torch.testing.assert_close(out, ref, **tol)
    # batch 1: single-token steps take the one-token FMA kernels (gate, up and act fused) and, gated, the fp32
    # residual stream that the down kernel adds into in place
    out = engine_steps(DecodeEngine(w, 1, 32, cfg), ids[:1], CHUNKS_24, heads[:1], neurons[:1])
    with attach_gating(pruned, TensorScores(heads[:1], neurons[:1]), GatingConfig(ffn_sparsity=0.5)), \
            torch.no_grad():
        ref = pruned(ids[:1]).logits
    torch.testing.assert_close(out, ref, **tol)


def test_decode_table_renders_rows():
    """benchmarks/decode_table.py: one markdown row per kept benchmark row, the model named once, the headline
    method in bold at batch 1, the predictor share as a percentage, batched rows filtered separately."""
    from benchmarks.decode_table import table
    base = dict(model="opt-13b", ms_per_token=5.795, floor_ms=4.53, gb_per_s=2327.0, frac_copy_bw=0.782, speedup=1.84,
                speedup_vs_best_dense=1.83, speedup_vs_hf_eager=5.02)
    rows = [dict(base, batch=1, method="ffn50+heads50"), dict(base, batch=1, method="predictor+ffn50+heads50",
                                                              predictor_share=0.027),
            dict(base, batch=8, method="ffn50+heads50"), dict(base, batch=8, method="ffn70")]
    lines = table(rows, None, None, methods_batched=["ffn50+heads50"]).splitlines()
    assert len(lines) == 2 + 3  # header, rule, 2 batch-1 rows, 1 batch-8 row (ffn70 filtered out)
    assert lines[2].startswith("| OPT-13B | 1 | ffn50+heads50 | **5.795**") and "**1.84**" in lines[2]
    assert lines[3].startswith("|  | 1 | predictor") and lines[3].endswith("| 2.7% |")
    assert lines[4].startswith("|  | 8 | ffn50+heads50 | 5.795 |") and lines[4].endswith("| 5.02 |  |")
    assert all(line.count("|") == 12 for line in lines)
