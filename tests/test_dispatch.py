"""The dense fallback (runtime/dispatch.py, EngineConfig.fallback): the rule, and an engine that follows it.

The rule is data (measured speed-ups per path and step size); these tests check what it decides from given
tables, that the shipped table says what docs/benchmarks.md measured where it matters, and that a step that falls
back is the dense model's step — with lazy K/V still exact across gated and dense steps.
"""
import pytest
import torch

import shadowsparse as ss
from shadowsparse.errors import ConfigError
from shadowsparse.llm import LLMConfig, load_llm
from shadowsparse.runtime import DecodeEngine, EngineConfig, extract_weights
from shadowsparse.runtime import dispatch

from tests.test_lazy_kv import long_skip_scores, mha_llama
from tests.test_runtime import TOL, token_ids

TABLE = {"wins": {1: 1.5, 8: 1.1}, "loses_at_8": {1: 1.5, 8: 0.9}, "loses_at_1": {1: 0.98}}


@pytest.mark.parametrize("path,rows,dense", [
    ("wins", 1, False), ("wins", 4, False), ("wins", 8, False), ("wins", 9, True),  # beyond every measurement
    ("loses_at_8", 1, False), ("loses_at_8", 2, True), ("loses_at_8", 8, True),  # bounded by the next one up
    ("loses_at_1", 1, True), ("unmeasured", 64, False)])
def test_measured_rule(path, rows, dense):
    assert dispatch.runs_dense(path, rows, "measured", table=TABLE) is dense
    assert dispatch.runs_dense(path, rows, "never", table=TABLE) is False
    assert dispatch.runs_dense(path, rows, "measured", cuda=False, table=TABLE) is False  # GPU measurements only


def test_given_row_count_and_bad_values():
    assert dispatch.runs_dense("anything", 3, 2) and not dispatch.runs_dense("anything", 2, 2)
    assert dispatch.runs_dense("anything", 3, 2, cuda=False)  # a user's own count holds on any device
    for bad in ("sometimes", -1, True, 1.5):
        with pytest.raises(ConfigError, match="fallback must be one of"):
            EngineConfig(fallback=bad).validate()
    assert "not measured" in dispatch.explain("unmeasured", "measured", table=TABLE)
    assert "1 rows 0.98x" in dispatch.explain("loses_at_1", "measured", table=TABLE)


def test_shipped_table_follows_the_measurements():
    """What docs/benchmarks.md measured: the sketch FFN alone loses at batch 1 on the H200 (0.98x), index sets win
    at batch 8 (1.40x) and lose in 64-token prefill steps (0.46x); 2:4 with index sets loses at batch 8 (0.84x);
    every score-then-gather selector loses at batch 2 (0.41-0.62x), teal wins only at batch 1 (1.34x)."""
    assert dispatch.runs_dense("ffn+sketch", 1, "measured")
    for path in ("ffn+sketch", "sketch+teal", "ffn+gate", "ffn+gate+verify", "ffn+sketch+verify"):
        assert dispatch.runs_dense(path, 2, "measured"), path
    assert not dispatch.runs_dense("teal", 1, "measured") and dispatch.runs_dense("teal", 2, "measured")
    assert not dispatch.runs_dense("threshold", 8, "measured")
    # prefill steps (several tokens per sequence) have their own table: every gated path lost there (H100, H200)
    for path, measured in dispatch.MEASURED_PREFILL.items():
        assert dispatch.runs_dense(path, 8, "measured", prefill=True) == (min(measured.items())[1] < 1.0)
    assert dispatch.runs_dense("ffn+heads", 8, "measured", prefill=True)  # 0.67x, though 1.40x at decode batch 8
    assert not dispatch.runs_dense("ffn+heads", 8, "measured")
    assert dispatch.runs_dense("ffn+gate", 64, "measured", prefill=True) is False  # 1.00x: a tie stays gated
    assert "prefill 8 rows 0.67x" in dispatch.explain("ffn+heads", "measured")
    assert not dispatch.runs_dense("ffn+heads", 8, "measured") and dispatch.runs_dense("ffn+heads", 64, "measured")
    assert not dispatch.runs_dense("ffn+heads+nm24", 1, "measured")
    assert dispatch.runs_dense("ffn+heads+nm24", 8, "measured")
    assert all(isinstance(r, int) and r >= 1 and s > 0 for t in (dispatch.MEASURED, dispatch.MEASURED_PREFILL)
               for m in t.values() for r, s in m.items())


def test_dp4a_sketch_paths_have_rows_or_take_the_fp32_kernels():
    """The dp4a sketch (int8 x) keys "+x8" paths: sketch_threshold's measured faster than the fp32 kernel's at
    batch 1, 2, 8 (H100: 1.24 / 1.09 / 0.90 against 1.22 / 1.01 / 0.76), so still dense at 8; an unmeasured "+x8"
    path (the top-k sketch, every prefill) takes the fp32 kernel's row: the slower kernel bounds it from below."""
    assert dispatch.MEASURED["ffn+sketch+threshold+x8"][2] > dispatch.MEASURED["ffn+sketch+threshold"][2]
    assert not dispatch.runs_dense("ffn+sketch+threshold+x8", 2, "measured")
    assert dispatch.runs_dense("ffn+sketch+threshold+x8", 8, "measured")
    assert dispatch.measured_row(dispatch.MEASURED, "ffn+sketch+x8") == dispatch.MEASURED["ffn+sketch"]
    assert dispatch.runs_dense("ffn+sketch+x8", 1, "measured")  # the top-k sketch: 0.98x on the H200
    assert dispatch.runs_dense("ffn+sketch+threshold+x8", 8, "measured", prefill=True)
    assert "1 rows 1.24x" in dispatch.explain("ffn+sketch+threshold+x8", "measured")
    assert dispatch.path_of({"x8", "sketch", "ffn", "threshold"}) == "ffn+sketch+threshold+x8"


def _scores(model, B, S, seed):
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, S, cfg.num_hidden_layers, cfg.num_attention_heads, generator=g),
            torch.randn(B, S, cfg.num_hidden_layers, cfg.intermediate_size, generator=g))


def test_fallback_step_is_the_dense_step():
    """fallback=1 at batch 2: every step has 2 rows and runs dense (equal to the dense engine); the same engine
    config at batch 1 gates (equal to the never-falling-back engine); the engine names its path."""
    model = mha_llama()
    w = extract_weights(model)
    ids = token_ids(2, 9, seed=3)
    heads, neurons = _scores(model, 2, 9, seed=4)
    cfg = dict(ffn_sparsity=0.5, head_sparsity=0.5, kv="dense")
    chunks = [(0, 5), (5, 6), (6, 7), (7, 9)]

    def run(engine, b):
        return torch.cat([engine.step(ids[:b, a:z], a, heads=heads[:b, a:z], neurons=neurons[:b, a:z])
                          for a, z in chunks], 1)

    fell = DecodeEngine(w, batch=2, max_len=16, config=EngineConfig(**cfg, fallback=1))
    assert fell.path == "ffn+heads" and fell.runs_dense(2)
    dense = DecodeEngine(w, batch=2, max_len=16)
    torch.testing.assert_close(run(fell, 2), run(dense, 2), **TOL)
    one = DecodeEngine(w, batch=1, max_len=16, config=EngineConfig(**cfg, fallback=1))
    gated = DecodeEngine(w, batch=1, max_len=16, config=EngineConfig(**cfg))
    out = torch.cat([one.step(ids[:1, t:t + 1], t, heads=heads[:1, t:t + 1], neurons=neurons[:1, t:t + 1])
                     for t in range(9)], 1)  # single-token steps: 1 row, gated
    ref = torch.cat([gated.step(ids[:1, t:t + 1], t, heads=heads[:1, t:t + 1], neurons=neurons[:1, t:t + 1])
                     for t in range(9)], 1)
    torch.testing.assert_close(out, ref, **TOL)
    assert (out - run(dense, 2)[:1]).abs().max() > 1e-3  # gating changed the output: the check is not vacuous


def test_lazy_kv_stays_exact_across_dense_fallback_steps():
    """Single-token steps alternate between gated (lazy K/V: only selected + refresh heads' K/V computed) and
    dense fallback, with a head skipped for longer than the window: the lazy engine equals the same schedule with
    every head's K/V computed at every step (kv='dense'). Without the refresh before a dense step, positions
    that leave the window during dense steps would keep stale K/V for heads no gated step refreshed."""
    model = mha_llama()
    w = extract_weights(model)
    window = 4
    S = 28
    ids = token_ids(1, S, seed=5)
    heads, neurons = long_skip_scores(model, 1, S, window, seed=6)
    dense_at = {7, 8, 9, 10, 11, 19, 20}  # single-token steps that fall back; five in a row: more than the window

    def run(kv):
        cfg = EngineConfig(ffn_sparsity=0.5, head_sparsity=0.5, kv=kv, kv_window=window)
        engine = DecodeEngine(w, batch=1, max_len=32, config=cfg)
        assert (engine.window is not None) == (kv == "lazy")
        out = [engine.step(ids[:, :5], 0, heads=heads[:, :5], neurons=neurons[:, :5])]
        for t in range(5, S):
            engine.cfg.fallback = 0 if t in dense_at else "never"  # 1 row > 0: dense
            out.append(engine.step(ids[:, t:t + 1], t, heads=heads[:, t:t + 1], neurons=neurons[:, t:t + 1]))
        return torch.cat(out, 1)

    torch.testing.assert_close(run("lazy"), run("dense"), **TOL)


@pytest.fixture(scope="module")
def llama():
    return load_llm(LLMConfig(name="random:llama", seed=0))


def test_load_gated_counts_dense_fallback_tokens_and_perplexity_stays_gated(llama):
    """fallback=3 through load_gated: the 5-token prompt runs dense, the 1-token decode steps gate; stats count
    the prompt's tokens as dense (realized sparsity over all tokens); perplexity ignores the fallback."""
    model, tok = llama
    g = ss.load_gated(model, method="teal", ffn_sparsity=0.4, engine="kernels", tokenizer=tok, fallback=3,
                      calib=torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0)),
                      overrides=["evaluate.threshold_windows=4"])
    never = ss.load_gated(model, method="teal", ffn_sparsity=0.4, engine="kernels", tokenizer=tok, fallback="never",
                          calib=torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0)),
                          overrides=["evaluate.threshold_windows=4"])
    windows = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    assert g.perplexity(windows) == pytest.approx(never.perplexity(windows), rel=1e-6)
    ids = tok("a b c d", return_tensors="pt").input_ids
    P, new = ids.shape[1], 4
    assert P > 3
    g.generate("a b c d", max_new_tokens=new)
    st = g.stats()
    assert st["dense_fallback_tokens"] == P and "dense above 3" in st["fallback"]
    never.generate("a b c d", max_new_tokens=new)
    st_never = never.stats()
    assert st_never["dense_fallback_tokens"] == 0
    assert 0 < st["realized_ffn_sparsity"] < st_never["realized_ffn_sparsity"]


@pytest.mark.parametrize("method", ["sketch", "sketch_threshold", "sketch_teal", "sketch_verify", "gate",
                                    "gate_verify", "teal", "threshold"])
def test_every_engine_selector_path_was_measured(llama, method):
    """Each training-free selector's engine path is a key of the shipped table: a path missing from it would stay
    gated wherever it loses (rule 3), so a renamed feature or a new selector without a measurement fails here."""
    model, tok = llama
    g = ss.load_gated(model, method=method, ffn_sparsity=0.5, engine="kernels", tokenizer=tok,
                      calib=torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0)),
                      overrides=["evaluate.threshold_windows=4", "evaluate.verify.calib_windows=4",
                                 "evaluate.verify.q=[0.7]"])
    path = g.decoder._engine(1, 8).path
    assert dispatch.measured_row(dispatch.MEASURED, path), path


def test_moe_engines_have_their_own_measurements():
    """An engine over mixture-of-experts layers keys its own rows (H100, Mixtral-8x7B shapes): index sets win at
    batch 1 (1.42-1.44x), tie at batch 8 (1.00-1.01x: the routed experts of 8 tokens cover most of them) and lose in
    8-token prefill steps; a dense model's row never decides for it. The MoE sketch (routed experts scored) wins at
    batch 1 and 2 (1.21x) and runs dense beyond them and in every prompt step."""
    from shadowsparse.llm import LLMConfig, load_llm
    from shadowsparse.runtime import DecodeEngine, EngineConfig, extract_weights
    weights = extract_weights(load_llm(LLMConfig(name="random:mixtral", seed=0))[0])
    engine = DecodeEngine(weights, 1, 16, EngineConfig(ffn_sparsity=0.5, head_sparsity=0.5))
    assert engine.path == "ffn+heads+moe" and engine.path in dispatch.MEASURED
    assert DecodeEngine(weights, 1, 16, EngineConfig()).path == ""  # ungated: no row, nothing to decide
    assert not dispatch.runs_dense("ffn+heads+moe", 1, "measured")
    assert not dispatch.runs_dense("ffn+heads+moe", 8, "measured")
    assert dispatch.runs_dense("ffn+heads+moe", 8, "measured", prefill=True)
    assert dispatch.runs_dense("ffn+heads+moe", 9, "measured")  # beyond every measured decode step
    assert not dispatch.runs_dense("ffn+sketch+moe", 2, "measured")
    assert dispatch.runs_dense("ffn+sketch+moe", 3, "measured")
    assert dispatch.runs_dense("ffn+sketch+moe", 8, "measured", prefill=True)
    assert "was not measured" in dispatch.explain("ffn+gate+moe", "measured")
