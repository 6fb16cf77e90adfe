"""Kernels that really skip work, each behind one function with a torch fallback (CPU, GPUs without Triton)."""
from .attention import decode_attention
from .ffn import gated_ffn, gated_ffn_reference, gated_ffn_torch
from .linear import row_linear, row_linear_t
from .nm24 import compress_24, decompress_24, nm24_linear, nm24_linear_t, prune_24
from .rope_norm import layer_norm, rms_norm, rope_

__all__ = ["compress_24", "decode_attention", "decompress_24", "gated_ffn", "gated_ffn_reference", "gated_ffn_torch",
           "layer_norm", "nm24_linear", "nm24_linear_t", "prune_24", "rms_norm", "row_linear", "row_linear_t",
           "rope_"]
