"""shadowsparse: contextual sparsity for LLMs — collect importance targets, fit a shared predictor, gate heads and
FFN neurons per token at inference, evaluate and report."""
from .arch import ArchSpec, register_arch
from .gating import (GatingConfig, GatingHandle, PredictorScores, StaticScores, TensorScores, attach_gating,
                     gated)
from .predictor import PerLayerPredictor, PredictorConfig, SharedPredictor

__all__ = ["ArchSpec", "register_arch", "attach_gating", "gated", "GatingConfig", "GatingHandle", "PredictorScores",
           "StaticScores", "TensorScores", "SharedPredictor", "PerLayerPredictor", "PredictorConfig", "load_gated",
           "GatedLM"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """load_gated / GatedLM load on first use (they pull in transformers and the selector registry)."""
    if name in ("load_gated", "GatedLM"):
        from . import generation
        return getattr(generation, name)
    raise AttributeError(f"module 'shadowsparse' has no attribute {name!r}")
