"""The collect stage: run calibration windows through the frozen LLM and write, per token (or per window), the
predictor input (N, d), head scores (N, L, H) and neuron scores (N, L, F) (plus, optionally, every layer's input
(N, L, d)) as sharded safetensors + manifest.json in ``<targets>/``, resumable from ``<targets>.partial/``.
The on-disk contract is docs/targets-format.md.

  config.py      TargetsConfig, the on-disk dtypes and top-k neuron encoding, the storage plan and disk check
  score.py       criteria hooks and score_window: one batch of windows -> head / neuron scores -> shard rows
  store.py       the work folder: atomic writes, lock, progress records, ShardWriter, publish, read_manifest
  reader.py      TargetsReader (streams rows from the memory-mapped shards), mean_scores, load_targets
  collect.py     collect(): the 1-process driver, and the checks and manifest shared with the DDP one
  collect_dp.py  collect_distributed(): the same over Lightning DDP ranks (import it from there: it needs lightning)

Submodules import each other directly (``from .store import ...``), never this package, so there is no cycle.
"""
from .collect import collect, collection_identity
from .config import DTYPES, FORMAT, NEURON_FILL, TargetsConfig, decode_neurons, index_dtype, storage_plan
from .reader import TargetsReader, load_targets, mean_scores
from .score import score_window
from .store import MANIFEST, PROGRESS, check_work, file_sha256, read_manifest, work_dir_for

__all__ = ["DTYPES", "FORMAT", "MANIFEST", "NEURON_FILL", "PROGRESS", "TargetsConfig", "TargetsReader", "check_work",
           "collect", "collection_identity", "decode_neurons", "file_sha256", "index_dtype", "load_targets",
           "mean_scores", "read_manifest", "score_window", "storage_plan", "work_dir_for"]
