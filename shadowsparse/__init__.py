"""shadowsparse: contextual sparsity for LLMs — collect importance targets, fit a shared predictor, gate heads and
FFN neurons per token at inference, evaluate and report."""
from .gating import (GatingConfig, GatingHandle, PredictorScores, StaticScores, TensorScores, attach_gating,
                     gated)
from .predictor import PredictorConfig, SharedPredictor

__all__ = ["attach_gating", "gated", "GatingConfig", "GatingHandle", "PredictorScores", "StaticScores",
           "TensorScores", "SharedPredictor", "PredictorConfig"]
__version__ = "0.1.0"
