"""Gated decode runtime: a model's weights in a decode layout, a static KV cache, one step that really skips the
unselected heads and neurons (Triton kernels on CUDA, torch fallbacks elsewhere), and its CUDA-graph capture.

Imports torch and transformers-free modules only (no hydra, datasets or lightning), so it runs on bare GPU boxes.
"""
from .cache import StaticKVCache
from .engine import DecodeEngine, EngineConfig, Selection
from .graph import GraphedDecoder
from .select import head_rows, padded_size, select_units
from .weights import EngineWeights, LayerWeights, extract_weights

__all__ = ["DecodeEngine", "EngineConfig", "EngineWeights", "GraphedDecoder", "LayerWeights", "Selection",
           "StaticKVCache", "extract_weights", "head_rows", "padded_size", "select_units"]
