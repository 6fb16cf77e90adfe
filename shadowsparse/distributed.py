"""Which process of a multi-process Lightning run this is, and what a launched process must (not) do.

Lightning's DDP and FSDP strategies start their extra processes by running the same command again
(``python train.py <overrides>``, with LOCAL_RANK / NODE_RANK / WORLD_SIZE set; under Hydra with the same run dir);
torchrun and SLURM start every process themselves. Either way each extra process runs ``pipeline.run`` from the top,
so the pipeline asks here whether it is such a process: one started for predictor training alone skips the frozen LLM
(rank 0 already holds it, checked the targets against it, and named the targets folder in FIT_TARGETS_ENV), and no
process but rank 0 evaluates, reports or writes metrics.
"""
from __future__ import annotations

import os

FIT_TARGETS_ENV = "SHADOWSPARSE_FIT_TARGETS"  # set by rank 0 before a multi-process fit: the targets folder


def is_rank_zero() -> bool:
    """Whether this is the process of global rank 0 (the user's own process when nothing launched it)."""
    if "RANK" in os.environ:  # torchrun
        return int(os.environ["RANK"]) == 0
    if int(os.environ.get("SLURM_NTASKS", 1)) > 1 and "SLURM_PROCID" in os.environ:
        return int(os.environ["SLURM_PROCID"]) == 0
    # Lightning's subprocess launcher: rank 0 is the user's process (it sets LOCAL_RANK=0, NODE_RANK=0 for itself)
    return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


def launched_all_at_once() -> bool:
    """Whether a launcher started this process together with the other ranks (torchrun, SLURM), rather than
    Lightning's launcher starting them from rank 0's own process when a stage needs them."""
    return "RANK" in os.environ or (int(os.environ.get("SLURM_NTASKS", 1)) > 1 and "SLURM_PROCID" in os.environ)


def fit_only_targets() -> str | None:
    """The targets folder when this process was launched for the predictor training alone (rank > 0), else None."""
    return os.environ.get(FIT_TARGETS_ENV) if not is_rank_zero() else None
