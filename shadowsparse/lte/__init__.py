"""Learn-To-be-Efficient (Zheng et al., arXiv 2402.06126): routers over groups of FFN neurons, trained with the
model so that it learns to need fewer of them; then hard routing at a target sparsity, through the same gating
hooks as every other method.

  config.py    LTEConfig (conf/lte/default.yaml)
  routers.py   neuron grouping, Routers, the two auxiliary losses, LTEScores (the ScoreSource)
  train.py     LTESystem (Lightning) and train_lte: stage 1 soft, stage 2 hard; full or LoRA fine-tuning
  artifact.py  safetensors checkpoint, load_lte, applied(model) for inference
  stage.py     the pipeline stage and config checks
"""
from .artifact import LTEArtifact, load_lte
from .config import LTEConfig, LoraSettings
from .routers import LTEScores, Routers, efficiency_loss, group_neurons, separability_loss
from .stage import LTE_DIR, lte_folder, stage_lte, validate_lte

__all__ = ["LTEArtifact", "load_lte", "LTEConfig", "LoraSettings", "LTEScores", "Routers", "efficiency_loss",
           "group_neurons", "separability_loss", "LTE_DIR", "lte_folder", "stage_lte", "validate_lte"]
