"""Exact shapes of the models the project targets, from their published config.json files, so that a model in a
real shape can be built with random weights and no download (``random-shape:<name>`` in shadowsparse.llm, the decode
benchmark in shadowsparse.runtime.bench). Only what the architecture needs is kept: dimensions, vocabulary, context,
norms and RoPE; the values match the hub configs of the ids in HUB_IDS.
"""
from __future__ import annotations

from functools import lru_cache

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
    # the other families' experiment models (conf/experiment/): dimensions, vocabulary and context of their hub configs
    "qwen2.5-7b": dict(family="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, max_position_embeddings=131072,
                       rms_norm_eps=1e-6, rope_theta=1000000.0, use_sliding_window=False, tie_word_embeddings=False),
    "gemma-7b": dict(family="gemma", hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                     num_attention_heads=16, num_key_value_heads=16, head_dim=256, vocab_size=256000,
                     max_position_embeddings=8192, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh"),
    "gemma-2-9b": dict(family="gemma2", hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=256, vocab_size=256000,
                       max_position_embeddings=8192, sliding_window=4096, query_pre_attn_scalar=256,
                       attn_logit_softcapping=50.0, final_logit_softcapping=30.0, rms_norm_eps=1e-6),
    "gemma-3-1b": dict(family="gemma3_text", hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
                       num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144,
                       max_position_embeddings=32768, sliding_window=512, query_pre_attn_scalar=256,
                       rms_norm_eps=1e-6),
    "phi-3-mini": dict(family="phi3", hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096,
                       sliding_window=2047, rms_norm_eps=1e-5, pad_token_id=32000, tie_word_embeddings=False),
    # mixture of experts: 8 experts of Mistral-7B's FFN shape per layer, 2 per token (46.7B parameters, 12.9B active)
    "mixtral-8x7b": dict(family="mixtral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                         vocab_size=32000, max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1000000.0,
                         sliding_window=None, tie_word_embeddings=False),
    "pythia-6.9b": dict(family="gpt_neox", hidden_size=4096, intermediate_size=16384, num_hidden_layers=32,
                        num_attention_heads=32, vocab_size=50432, max_position_embeddings=2048,
                        use_parallel_residual=True, layer_norm_eps=1e-5, tie_word_embeddings=False),
    "falcon-7b": dict(family="falcon", hidden_size=4544, num_hidden_layers=32, num_attention_heads=71,
                      vocab_size=65024, max_position_embeddings=2048, multi_query=True, parallel_attn=True,
                      new_decoder_architecture=False, alibi=False, bias=False, layer_norm_epsilon=1e-5),
    "gpt2-xl": dict(family="gpt2", n_embd=1600, n_layer=48, n_head=25, vocab_size=50257, n_positions=1024),
    "stablelm-2-1.6b": dict(family="stablelm", hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                            num_attention_heads=32, num_key_value_heads=32, vocab_size=100352,
                            max_position_embeddings=4096, use_qkv_bias=True, layer_norm_eps=1e-5,
                            tie_word_embeddings=False),
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
    "HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2-135m", "Qwen/Qwen2.5-7B": "qwen2.5-7b",
    "google/gemma-7b": "gemma-7b", "google/gemma-2-9b": "gemma-2-9b", "google/gemma-3-1b-pt": "gemma-3-1b",
    "microsoft/Phi-3-mini-4k-instruct": "phi-3-mini", "EleutherAI/pythia-6.9b": "pythia-6.9b",
    "tiiuae/falcon-7b": "falcon-7b", "openai-community/gpt2-xl": "gpt2-xl",
    "stabilityai/stablelm-2-1_6b": "stablelm-2-1.6b", "mistralai/Mixtral-8x7B-v0.1": "mixtral-8x7b",
}


def shape_of(name: str) -> dict:
    if name not in SHAPES:
        raise ConfigError(f"unknown model shape '{name}'; choose from {sorted(SHAPES)} (shadowsparse/shapes.py)")
    return SHAPES[name]


def build_config(name: str):
    """The transformers config of a shape (no download): the family's config class with the shape's values over its
    defaults; ``rope_theta`` goes into the family's own RoPE parameters."""
    from transformers import AutoConfig
    kw = dict(shape_of(name))
    family = kw.pop("family")
    theta = kw.pop("rope_theta", None)
    config = AutoConfig.for_model(family, **kw)
    if theta is not None:
        config.rope_parameters = {**config.rope_parameters, "rope_theta": theta}
    return config


@lru_cache(maxsize=None)
def n_params(name: str) -> int:
    """Parameter count of a shape: its model built on the meta device (no memory), embeddings counted once when
    tied. tests/test_random_shape.py holds it to the published counts."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(build_config(name))
    model.tie_weights()  # transformers ties embeddings when it loads weights; an empty model is not tied yet
    return sum(p.numel() for p in model.parameters())
