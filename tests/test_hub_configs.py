"""Every experiment config composes and passes pipeline.validate; the hub-model ones are checked against the models'
real shapes (shadowsparse/shapes.py) without a download; and gating hooks coexist with accelerate's dispatch hooks
(what device_map="auto" puts on a model split over GPUs), on CPU."""
from pathlib import Path

import pytest
import torch

from shadowsparse.errors import ConfigError
from shadowsparse.llm import LLMConfig, check_context, load_llm, parse_dtype
from shadowsparse.pipeline import validate
from shadowsparse.shapes import HUB_IDS, build_config, n_params
from shadowsparse.targets import storage_plan
from tests.conftest import ROOT, compose

EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
HUB = ["opt1_3b", "opt6_7b", "opt13b", "opt30b", "llama2_7b", "llama2_13b", "llama3_8b", "mistral7b", "qwen2_5_7b",
       "gemma_7b", "gemma2_9b", "gemma3_1b", "phi3_mini", "pythia_6_9b", "falcon_7b", "gpt2_xl", "stablelm2_1_6b",
       "mixtral_8x7b"]
GPU_BYTES = 80e9  # one H100/A100 80 GB


def _compose(tmp_path, name, *more):
    return compose(f"experiment={name}", f"paths.output_dir={tmp_path}/run", f"paths.cache_dir={tmp_path}/cache",
                   *more)


def test_the_issue_models_all_have_an_experiment():
    assert set(HUB) <= set(EXPERIMENTS), set(HUB) - set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_validates(tmp_path, name):
    validate(_compose(tmp_path, name))


@pytest.mark.parametrize("name", HUB)
def test_hub_experiment_fits_its_model(tmp_path, name):
    """Hub id known, dtype a half type, windows within the model's context, and a model whose weights would take
    more than 60% of one 80 GB GPU is split over GPUs (llm.device=auto): the plainact backward keeps every layer's
    activations of a window next to the weights."""
    cfg = _compose(tmp_path, name)
    assert cfg.llm.name in HUB_IDS, f"{cfg.llm.name}: add its shape to shadowsparse/shapes.py"
    shape = HUB_IDS[cfg.llm.name]
    dtype = parse_dtype(cfg.llm.dtype)
    assert dtype in (torch.float16, torch.bfloat16)
    config = build_config(shape)
    check_context(config, {"data.calib.seq_len": cfg.data.calib.seq_len, "data.eval.seq_len": cfg.data.eval.seq_len})
    weights = n_params(shape) * 2
    assert cfg.llm.device == ("auto" if weights > 0.6 * GPU_BYTES else "cuda"), (shape, weights / 1e9)
    assert cfg.trainer.accelerator == "gpu"
    # the family is one the mask path serves, and its dimensions are what the collection will read
    from shadowsparse.arch import ARCHS, config_dims
    from shadowsparse.pipeline import targets_config
    assert config.model_type in ARCHS
    dims = config_dims(config)
    # the predictor's factorized neuron table (L, r, F) stays a small fraction of the model
    assert dims.n_layers * cfg.predictor.model.rank * dims.ffn < 0.02 * n_params(shape)
    # the storage the file's comment promises is what the collection will plan (bytes per token)
    per_token = storage_plan(targets_config(cfg), dims, 1)["bytes_per_row_total"]
    assert f"x {per_token:,} bytes" in (ROOT / "conf" / "experiment" / f"{name}.yaml").read_text()
    # and its random-weight twin composes too (the no-download GPU run)
    validate(_compose(tmp_path, name, f"llm.name=random-shape:{shape}"))


def test_context_check_refuses_a_window_past_the_model():
    with pytest.raises(ConfigError, match="data.eval.seq_len=4096 exceeds the model's maximum context of 2048"):
        check_context(build_config("opt-13b"), {"data.eval.seq_len": 4096})


# -- accelerate device maps ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny random Llama saved like a hub checkpoint (config, safetensors, tokenizer)."""
    model, tok = load_llm(LLMConfig(name="random:llama", seed=0))
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _split_map(model) -> dict:
    """Every decoder layer its own dispatch block, as device_map="auto" makes over several GPUs (all on CPU here)."""
    n = model.config.num_hidden_layers
    return {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
            **{f"model.layers.{i}": "cpu" for i in range(n)}}


def _hook_count(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_device_map_auto_loads_through_accelerate(tiny_folder, monkeypatch):
    """llm.device=auto hands device_map="auto" to from_pretrained (on a CPU-only host the map is one device, so
    transformers dispatches nothing: the spy shows the request, the logits that nothing else changed)."""
    from transformers import AutoModelForCausalLM
    seen = []
    real = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs.get("device_map"))
        return real(cls, *args, **kwargs)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    model, tok = load_llm(LLMConfig(name=str(tiny_folder), dtype="float32", device="auto"))
    assert seen == ["auto"]
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    plain, _ = load_llm(LLMConfig(name=str(tiny_folder), dtype="float32", device="cpu"))
    ids = tok("device maps", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("selector", ["static", "predictor"])
@pytest.mark.parametrize("offload", [False, True], ids=["dispatched", "cpu-offloaded"])
def test_gating_coexists_with_accelerate_hooks_and_remove_restores(tiny_folder, ids, offload, selector):
    """accelerate's AlignDevicesHook wraps module.forward (dispatch_model with a split map; with offload the
    weights even live on the meta device between calls). Gating adds plain forward pre-hooks next to it: the gated
    output equals gating the plain model, and remove() leaves accelerate's hooks and the dense output as they were."""
    from accelerate import cpu_offload, dispatch_model

    from shadowsparse.arch import ModelView
    from shadowsparse.gating import GatingConfig, StaticScores, attach_gating
    plain, _ = load_llm(LLMConfig(name=str(tiny_folder), dtype="float32"))
    model, _ = load_llm(LLMConfig(name=str(tiny_folder), dtype="float32"))
    if offload:
        cpu_offload(model, execution_device=torch.device("cpu"))
        assert model.model.layers[0].mlp.down_proj.weight.device.type == "meta"
    else:
        dispatch_model(model, _split_map(model), force_hooks=True)
    hooked = [n for n, m in model.named_modules() if hasattr(m, "_hf_hook")]
    assert hooked, "accelerate attached no hooks"
    wrapped = {n: m.forward for n, m in model.named_modules() if hasattr(m, "_hf_hook")}
    before = _hook_count(model)
    with torch.no_grad():
        dense = model(ids).logits
    torch.testing.assert_close(dense, plain(ids).logits, rtol=0, atol=0)

    view = ModelView(plain)
    g = torch.Generator().manual_seed(0)
    if selector == "static":
        scores = StaticScores(torch.rand(view.dims.n_layers, view.dims.n_heads, generator=g),
                              torch.rand(view.dims.n_layers, view.dims.ffn, generator=g))
    else:  # a (random) shared predictor: its pre-hook on layer 1 runs beside accelerate's wrapper of that layer
        from shadowsparse import PredictorConfig, SharedPredictor
        torch.manual_seed(0)
        d = view.dims
        scores = SharedPredictor(d.hidden, d.n_layers, d.n_heads, d.ffn, 0, PredictorConfig(hidden=32, rank=4)).eval()
    cfg = GatingConfig(ffn_sparsity=0.5, head_sparsity=0.5, first_layer=1)
    with torch.no_grad():
        with attach_gating(plain, scores, cfg):
            want = plain(ids).logits
        handle = attach_gating(model, scores, cfg)
        assert _hook_count(model) > before
        got = model(ids).logits
        stats = handle.stats()
        handle.remove()
        after = model(ids).logits
    assert not torch.equal(want, dense)  # the gating did something
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert stats["realized_ffn_sparsity"] == pytest.approx(0.5, abs=0.02)
    torch.testing.assert_close(after, dense, rtol=0, atol=0)  # dense again, bit for bit
    assert _hook_count(model) == before
    assert [n for n, m in model.named_modules() if hasattr(m, "_hf_hook")] == hooked
    assert all(m.forward is wrapped[n] for n, m in model.named_modules() if n in wrapped)


def test_the_readme_big_model_commands_compose():
    """Every `python train.py ...` line of the README's "Big models" section is a valid Hydra command line (keys
    exist, groups exist); validation proper needs the GPUs they ask for."""
    import shlex
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Big models"):text.index("## Speed on a GPU")]
    commands = [line.split("#")[0] for line in section.splitlines() if line.startswith("python train.py")]
    assert len(commands) >= 5
    for command in commands:
        cfg = compose(*shlex.split(command)[2:])
        assert cfg.llm.name
