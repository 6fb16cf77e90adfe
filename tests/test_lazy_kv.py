"""Lazy K/V (engine.py's kv="lazy"): the keys and values of heads skipped earlier are recomputed from the input
window, and the engine still equals the mask path (which computes every head's K/V at every token).

CPU, fp32, tiny random OPT and MHA Llama and Qwen3 (lazy K/V needs one kv head per query head; Qwen3 normalizes
each recomputed q and k head before RoPE). The Triton kernels run
interpreted here (conftest sets TRITON_INTERPRET=1 without CUDA) and for real on a GPU.
"""
import pytest
import torch

from shadowsparse import GatingConfig, TensorScores, attach_gating
from shadowsparse.errors import ConfigError
from shadowsparse.kernels.kv_window import kv_window_write, kv_window_write_torch
from shadowsparse.runtime import DecodeEngine, EngineConfig, extract_weights
from shadowsparse.runtime.ops import rope_inv_freq

from tests.conftest import tiny_model
from tests.test_runtime import BACKENDS, TOL, TRITON_DEVICE, TRITON_TOL, engine_steps, token_ids


def mha_llama():
    from transformers import LlamaForCausalLM

    from shadowsparse.llm import tiny_config
    cfg = tiny_config("llama")
    cfg.num_key_value_heads = cfg.num_attention_heads
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def mha_qwen3():
    """Tiny Qwen3 with one kv head per query head and random q/k norm weights (transformers starts them at ones)."""
    from transformers import Qwen3ForCausalLM

    from shadowsparse.llm import tiny_config
    from tests.test_runtime import random_norms
    cfg = tiny_config("qwen3")
    cfg.num_key_value_heads = cfg.num_attention_heads
    torch.manual_seed(0)
    return random_norms(Qwen3ForCausalLM(cfg).eval())


def _model(family):
    return {"llama": mha_llama, "qwen3": mha_qwen3}.get(family, lambda: tiny_model("opt"))()


def long_skip_scores(model, B, S, W, seed):
    """Random scores (B, S, L, H) / (B, S, L, F), except that head 0 of every layer is skipped from step 6 for
    2W + 1 steps, then selected: its K/V at those positions exist only through the refresh rotation."""
    cfg = model.config
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    F_ = getattr(cfg, "intermediate_size", None) or cfg.ffn_dim
    g = torch.Generator().manual_seed(seed)
    heads, neurons = torch.randn(B, S, L, H, generator=g), torch.randn(B, S, L, F_, generator=g)
    heads[:, 6:7 + 2 * W, :, 0] = -10.0
    heads[:, 7 + 2 * W:, :, 0] = 10.0
    return heads, neurons


@pytest.mark.parametrize("family", ["llama", "opt", "qwen3"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch,window", [(1, 4), (2, 8)])
def test_lazy_kv_engine_matches_mask_path(family, backend, batch, window):
    """Prefill, single-token steps (lazy), a 3-token step in the middle (refresh of every head), more single
    steps; FFN 50% + heads 50%: logits equal the mask path's at every position."""
    device, tol = (TRITON_DEVICE, TRITON_TOL) if backend == "triton" else ("cpu", TOL)
    model = _model(family).to(device)
    chunks = [5] + [1] * (2 * window + 4) + [3] + [1] * 6
    S = sum(chunks)
    ids = token_ids(batch, S, seed=11).to(device)
    heads, neurons = (t.to(device) for t in long_skip_scores(model, batch, S, window, seed=12))
    hs = 0.5 if batch == 1 else 0.75  # batch 2 reads the union of two tokens' heads: 1 + 1 (+ 1 refresh) < 4
    cfg = EngineConfig(ffn_sparsity=0.5, head_sparsity=hs, kv="lazy", kv_window=window, backend=backend)
    engine = DecodeEngine(extract_weights(model), batch=batch, max_len=48, config=cfg)
    assert engine.window is not None and engine.kv_refresh == -(-4 // window)
    assert engine.rows_read(batch)["kv_heads"] == batch * engine.k_heads + engine.kv_refresh < 4  # fewer K/V rows
    out = engine_steps(engine, ids, chunks, heads, neurons)
    with attach_gating(model, TensorScores(heads, neurons), GatingConfig(ffn_sparsity=0.5, head_sparsity=hs)), \
            torch.no_grad():
        ref = model(ids).logits
    torch.testing.assert_close(out, ref, **tol)


def test_without_refresh_the_skipped_head_would_be_wrong():
    """The check above is not vacuous: with the refresh rotation switched off (r = 0) the long-skipped head reads
    stale keys and the logits after its return differ from the mask path."""
    model = _model("opt")
    window = 4
    chunks = [5] + [1] * (2 * window + 8)
    S = sum(chunks)
    ids = token_ids(1, S, seed=13)
    heads, neurons = long_skip_scores(model, 1, S, window, seed=14)
    engine = DecodeEngine(extract_weights(model), batch=1, max_len=48,
                          config=EngineConfig(head_sparsity=0.5, kv="lazy", kv_window=window))
    engine.kv_refresh = 0
    engine.refresh_offsets = engine.refresh_offsets[:0]
    out = engine_steps(engine, ids, chunks, heads, neurons)
    gcfg = GatingConfig(ffn_sparsity=0.0, head_sparsity=0.5)
    with attach_gating(model, TensorScores(heads, neurons), gcfg), torch.no_grad():
        ref = model(ids).logits
    back = 7 + 2 * window  # the first position where head 0 is selected again
    torch.testing.assert_close(out[:, :6], ref[:, :6], **TOL)
    assert (out[:, back:] - ref[:, back:]).abs().max() > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rope", [True, False])
def test_kv_window_kernel_matches_torch(backend, rope):
    """Scatter + RoPE of a (B*W, 2*J*D) window into the cache; a head listed twice; Triton equals the torch path."""
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    B, W, J, KV, S, D = 2, 3, 3, 5, 11, 16
    g = torch.Generator().manual_seed(0)
    kv = torch.randn(B * W, 2 * J * D, generator=g).to(device)
    kv = kv.view(B * W, 2, J, D)
    kv[:, :, 2] = kv[:, :, 0]  # heads[2] == heads[0]: same values, written twice
    kv = kv.reshape(B * W, 2 * J * D)
    heads = torch.tensor([4, 1, 4], dtype=torch.int32, device=device)
    positions = torch.tensor([7, 5, 6], device=device)
    inv_freq = rope_inv_freq(D, 10000.0, device) if rope else None
    caches = [torch.zeros(B, KV, S, D, device=device) for _ in range(4)]
    kv_window_write(kv, caches[0], caches[1], heads, positions, inv_freq, backend=backend)
    kv_window_write_torch(kv, caches[2], caches[3], heads, positions, inv_freq)
    tol = TRITON_TOL if backend == "triton" else TOL
    torch.testing.assert_close(caches[0], caches[2], **tol)
    torch.testing.assert_close(caches[1], caches[3], **tol)
    # values land unrotated at [b, head, position]; keys at position 0 of the rotation would be unrotated too
    v = kv.view(B, W, 2, J, D)[:, :, 1]
    torch.testing.assert_close(caches[1][:, 1, 5], v[:, 1, 1].to(caches[1].dtype), **tol)
    assert caches[0][:, [0, 2, 3]].abs().sum() == 0  # untouched heads stay zero
    if not rope:
        torch.testing.assert_close(caches[0][:, 4, 7], kv.view(B, W, 2, J, D)[:, 0, 0, 0], **tol)


def test_auto_picks_lazy_only_where_it_is_exact_and_cheaper():
    opt = extract_weights(tiny_model("opt"))
    gqa = extract_weights(tiny_model("llama"))  # 4 query heads over 2 kv heads
    assert DecodeEngine(opt, 1, 32, EngineConfig(head_sparsity=0.5)).window is not None
    assert DecodeEngine(opt, 1, 32, EngineConfig(head_sparsity=0.5)).window.window == 16
    vote = EngineConfig(head_sparsity=0.5, batch_set="vote")  # one set of k heads for the batch's tokens
    assert DecodeEngine(opt, 4, 32, vote).window.window == 4  # 16 // batch
    assert DecodeEngine(opt, 4, 32, EngineConfig(head_sparsity=0.5)).window is None  # a 4-token union: every head
    assert DecodeEngine(opt, 1, 32, EngineConfig(ffn_sparsity=0.5)).window is None  # no head gating
    assert DecodeEngine(opt, 1, 32, EngineConfig(head_sparsity=0.5, kv="dense")).window is None
    assert DecodeEngine(gqa, 1, 32, EngineConfig(head_sparsity=0.5)).window is None
    assert DecodeEngine(opt, 1, 32, EngineConfig(head_sparsity=0.25, kv_window=2)).window is None  # 3 + 2 >= 4


def test_lazy_kv_bad_input_names_the_fix():
    opt = extract_weights(tiny_model("opt"))
    gqa = extract_weights(tiny_model("llama"))
    with pytest.raises(ConfigError, match="groups K/V heads"):
        DecodeEngine(gqa, 1, 32, EngineConfig(head_sparsity=0.5, kv="lazy"))
    with pytest.raises(ConfigError, match=r"batch \* kv_window must be <= 16"):
        DecodeEngine(opt, 2, 32, EngineConfig(head_sparsity=0.5, kv="lazy", kv_window=16))
    with pytest.raises(ConfigError, match="needs head gating"):
        DecodeEngine(opt, 1, 32, EngineConfig(ffn_sparsity=0.5, kv="lazy"))
    with pytest.raises(ConfigError, match="kv must be"):
        EngineConfig(kv="sometimes").validate()
    with pytest.raises(ConfigError, match="kv_window must be"):
        EngineConfig(kv_window=1).validate()


@pytest.mark.parametrize("family", ["llama", "opt", "qwen3"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_many_token_steps_take_the_masked_path(family, backend):
    """A step of more than 16 token rows (a prompt in one go) runs the gated layers as the mask path on dense GEMMs
    (its 17 tokens per sequence also take the SDPA attention); the logits still equal the mask path's, and lazy
    K/V steps after it (the window written by the long step) and a later 20-row step (every head refreshed first)
    stay exact."""
    device, tol = (TRITON_DEVICE, TRITON_TOL) if backend == "triton" else ("cpu", TOL)
    model = _model(family).to(device)
    window, batch = 4, 2
    chunks = [17] + [1] * (2 * window + 2) + [10] + [1] * 3
    S = sum(chunks)
    ids = token_ids(batch, S, seed=15).to(device)
    heads, neurons = (t.to(device) for t in long_skip_scores(model, batch, S, window, seed=16))
    cfg = EngineConfig(ffn_sparsity=0.5, head_sparsity=0.75, kv="lazy", kv_window=window, backend=backend)
    engine = DecodeEngine(extract_weights(model), batch=batch, max_len=48, config=cfg)
    seen, select = [], engine.select

    def spy(h, n):  # records which steps took the masked path (one select() per step: it advances the refresh)
        sel = select(h, n)
        seen.append(sel.masked)
        return sel
    engine.select = spy
    out = engine_steps(engine, ids, chunks, heads, neurons)
    assert seen[0] and seen[-4] and not any(seen[1:-4]) and not any(seen[-3:])  # 2 x 10 rows > 16: masked
    with attach_gating(model, TensorScores(heads, neurons), GatingConfig(ffn_sparsity=0.5, head_sparsity=0.75)), \
            torch.no_grad():
        ref = model(ids).logits
    torch.testing.assert_close(out, ref, **tol)
    with pytest.raises(ConfigError, match="step_tokens must be in"):
        engine.prefill(ids[:, :4], step_tokens=65)
