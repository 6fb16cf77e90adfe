"""load_gated / GatedLM: the decoding loop against Hugging Face generate under the same gating, left-padded batches,
sampling, stop strings, perplexity through the same path, and the refusals."""
import pytest
import torch

import shadowsparse as ss
from shadowsparse.errors import ConfigError
from shadowsparse.gating import attach_gating
from shadowsparse.llm import LLMConfig, load_llm
from shadowsparse.perplexity import Level, evaluate_levels

CALIB = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))
FAST = ["evaluate.verify.calib_windows=4", "evaluate.threshold_windows=2"]


@pytest.fixture(scope="module")
def llama():
    return load_llm(LLMConfig(name="random:llama", seed=0))


def gated(llama, method="sketch", **kw):
    model, tok = llama
    kw.setdefault("engine", "hooks")  # the mask path: the engine's own tests are tests/test_engine_selectors.py
    return ss.load_gated(model, method=method, tokenizer=tok, calib=CALIB, overrides=FAST, **kw)


@pytest.mark.parametrize("method", ["sketch", "gate", "random"])
def test_greedy_equals_hf_generate_under_the_same_hooks(llama, method):
    model, tok = llama
    g = gated(llama, method, ffn_sparsity=0.5)
    text = g.generate("hello world", max_new_tokens=10)
    ids = torch.tensor([tok("hello world")["input_ids"]])
    source = g.decoder.source
    if method == "random":  # a fresh generator: the same random draws as the decoder's first use
        source.generators.clear()
    with attach_gating(model, source, g.gating), torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, min_new_tokens=10,
                             do_sample=False, pad_token_id=0)
    assert text == tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
    assert g.stats()["realized_ffn_sparsity"] == pytest.approx(0.5, abs=1e-6)


def test_left_padded_batch_equals_each_prompt_alone(llama):
    g = gated(llama, "sketch", ffn_sparsity=0.5)
    prompts = ["a much longer prompt than the other one", "short"]
    batch = g.generate(prompts, max_new_tokens=8)
    assert batch == [g.generate(p, max_new_tokens=8) for p in prompts]


def test_sampling_is_seeded_and_stop_strings_cut(llama):
    g = gated(llama, "dense")
    a = g.generate("hi", max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=1)
    assert a == g.generate("hi", max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=1)
    assert a != g.generate("hi", max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=2)
    full = g.generate("hi", max_new_tokens=12)
    stop = full[3:5]
    cut = g.generate("hi", max_new_tokens=12, stop=[stop])
    assert cut == full[:full.find(stop)] and stop not in cut
    assert "".join(g.stream("hi", max_new_tokens=12, stop=[stop])) == cut
    assert "".join(g.stream("hi", max_new_tokens=12)) == full


def test_perplexity_equals_the_evaluation(llama):
    model, _ = llama
    g = gated(llama, "sketch", ffn_sparsity=0.5)
    windows = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(3))
    (lv,) = evaluate_levels(model, windows, g.decoder.source, [Level(0.5, 0.0)], g.gating.first_layer)
    assert g.perplexity(windows) == pytest.approx(lv.ppl, rel=1e-6)


@pytest.mark.parametrize("kw,message", [
    (dict(method="oracle"), "cannot serve oracle: it needs a dense pass"),
    (dict(method="lte"), "no trained LTE at .*point lte.ckpt at a run's lte/ folder"),
    (dict(method="teal", head_sparsity=0.5), "no head axis"),
    (dict(method="sketch", head_sparsity=0.5), "no head axis"),
    (dict(method="nope"), "unknown evaluation method"),
    (dict(method="sketch", engine="fast"), "engine must be one of"),
    (dict(method="sketch", fallback="sometimes"), "fallback must be one of .*or a row count"),
])
def test_refusals_name_the_fix(llama, kw, message):
    with pytest.raises(ConfigError, match=message):
        gated(llama, **kw)


def test_prompt_past_the_context_is_refused(llama):
    g = gated(llama, "dense")
    with pytest.raises(ConfigError, match="exceeds the model's context"):
        g.generate("word " * 300, max_new_tokens=8)
    with pytest.raises(ConfigError, match="not a train.py run directory"):
        ss.load_gated("/nonexistent/run", method="sketch")


def test_a_run_from_before_int8_x_keeps_its_fp32_sketch(tmp_path):
    """load_gated(run_dir) serves the estimate the run evaluated: a saved config without evaluate.verify.x_bits
    (runs made before it existed) reads as x_bits null (fp32 x); a saved value and a user's override win."""
    from omegaconf import OmegaConf

    from shadowsparse.config import verify_config
    from shadowsparse.generation import saved_run_config
    old, new = tmp_path / "old.yaml", tmp_path / "new.yaml"
    OmegaConf.save(OmegaConf.create({"evaluate": {"verify": {"bits": 3}}}), old)
    OmegaConf.save(OmegaConf.create({"evaluate": {"verify": {"bits": 3, "x_bits": 8}}}), new)
    assert verify_config(saved_run_config(old, [])).x_bits is None
    assert verify_config(saved_run_config(new, [])).x_bits == 8
    assert verify_config(saved_run_config(old, ["evaluate.verify.x_bits=8"])).x_bits == 8
