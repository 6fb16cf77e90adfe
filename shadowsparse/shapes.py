"""Exact shapes of the models the project targets, from their published config.json files, so that a model in a
real shape can be built with random weights and no download (``random-shape:<name>`` in shadowsparse.llm, the decode
benchmark in shadowsparse.runtime.bench). Only what the architecture needs is kept: dimensions, vocabulary, context,
norms and RoPE; the values match the hub configs of the ids in HUB_IDS.
"""
from __future__ import annotations

from .errors import ConfigError

SHAPES = {
    # OPT: ReLU FFN, MHA, learned positions (2048), pre-LayerNorm, biases
    "opt-1.3b": dict(family="opt", hidden_size=2048, num_attention_heads=32, num_hidden_layers=24, ffn_dim=8192,
                     vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=2048,
                     do_layer_norm_before=True, enable_bias=True, activation_function="relu"),
    "opt-6.7b": dict(family="opt", hidden_size=4096, num_attention_heads=32, num_hidden_layers=32, ffn_dim=16384,
                     vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=4096,
                     do_layer_norm_before=True, enable_bias=True, activation_function="relu"),
    "opt-13b": dict(family="opt", hidden_size=5120, num_attention_heads=40, num_hidden_layers=40, ffn_dim=20480,
                    vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=5120,
                    do_layer_norm_before=True, enable_bias=True, activation_function="relu"),
    "opt-30b": dict(family="opt", hidden_size=7168, num_attention_heads=56, num_hidden_layers=48, ffn_dim=28672,
                    vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=7168,
                    do_layer_norm_before=True, enable_bias=True, activation_function="relu"),
    # Llama family: SwiGLU FFN, RoPE, RMSNorm, no biases
    "llama-2-7b": dict(family="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False),
    "llama-2-13b": dict(family="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=40, vocab_size=32000,
                        max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                        tie_word_embeddings=False),
    "llama-3-8b": dict(family="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                       rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False),
    "mistral-7b": dict(family="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768,
                       rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096, tie_word_embeddings=False),
    "smollm2-135m": dict(family="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                         rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True),
    # tiny shapes for smoke runs of the benchmark and CPU tests of the random-shape path
    "tiny-llama": dict(family="llama", hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024,
                       tie_word_embeddings=False),
    "tiny-opt": dict(family="opt", hidden_size=256, num_attention_heads=4, num_hidden_layers=4, ffn_dim=1024,
                     vocab_size=512, max_position_embeddings=1024, word_embed_proj_dim=256, do_layer_norm_before=True,
                     enable_bias=True),
}

# hub id -> shape name: the experiment configs' models (their random-weight twins: llm.name=random-shape:<shape>)
HUB_IDS = {
    "facebook/opt-1.3b": "opt-1.3b", "facebook/opt-6.7b": "opt-6.7b", "facebook/opt-13b": "opt-13b",
    "facebook/opt-30b": "opt-30b", "meta-llama/Llama-2-7b-hf": "llama-2-7b", "meta-llama/Llama-2-13b-hf": "llama-2-13b",
    "meta-llama/Meta-Llama-3-8B": "llama-3-8b", "mistralai/Mistral-7B-v0.1": "mistral-7b",
    "HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2-135m",
}


def shape_of(name: str) -> dict:
    if name not in SHAPES:
        raise ConfigError(f"unknown model shape '{name}'; choose from {sorted(SHAPES)} (shadowsparse/shapes.py)")
    return SHAPES[name]


def build_config(name: str):
    """The transformers config of a shape (no download)."""
    from transformers import LlamaConfig, MistralConfig, OPTConfig
    kw = dict(shape_of(name))
    family = kw.pop("family")
    if family == "opt":
        return OPTConfig(**kw)
    theta = kw.pop("rope_theta", 10000.0)
    rope = {"rope_type": "default", "rope_theta": theta}
    if family == "mistral":
        return MistralConfig(**kw, rope_parameters=rope)
    return LlamaConfig(**kw, rope_parameters=rope)


def n_params(name: str) -> int:
    """Parameter count of a shape, from its dimensions (embeddings counted once when tied)."""
    s = shape_of(name)
    d, L, V = s["hidden_size"], s["num_hidden_layers"], s["vocab_size"]
    if s["family"] == "opt":
        F = s["ffn_dim"]
        layer = 4 * (d * d + d) + 2 * d * F + F + d + 4 * d  # q k v o (+ biases), fc1 fc2 (+ biases), 2 LayerNorms
        return V * d + (s["max_position_embeddings"] + 2) * d + L * layer + 2 * d  # tied lm_head, final LayerNorm
    F, H, KV = s["intermediate_size"], s["num_attention_heads"], s["num_key_value_heads"]
    head_dim = d // H
    layer = 2 * d * d + 2 * d * KV * head_dim + 3 * d * F + 2 * d
    return V * d * (1 if s.get("tie_word_embeddings") else 2) + L * layer + d
