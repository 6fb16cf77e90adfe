"""Data-parallel target collection through Lightning DDP (no hand-written process launching).

How it runs from ``python train.py ... targets.devices=N [targets.accelerator=gpu] [targets.num_nodes=M]``:

1. The script runs as usual up to stage_collect, which builds a Trainer(strategy=ddp, devices=N, num_nodes=M) and
   calls ``trainer.predict`` on a CollectModule. Lightning's subprocess launcher then re-runs the very same command
   line once per extra local rank (with Hydra in use it adds ``hydra.run.dir=<this run's dir>``,
   ``hydra.job.name=train_ddp_process_<r>`` and ``hydra.output_subdir=null``, and starts it in the original working
   directory, so relative paths resolve as in the parent). Other nodes run the same command themselves with
   NODE_RANK / MASTER_ADDR / MASTER_PORT set (or under SLURM / torchrun, which Lightning detects).
2. Every rank therefore loads its own copy of the model, exactly as rank 0 did (same config, same seed: same
   random weights, same static mask, same windows). With ``llm.device=cuda`` the copy goes straight to the rank's
   own GPU: ``bind_rank_device`` (called before the model loads) makes "cuda" mean cuda:LOCAL_RANK. The frozen model
   is held outside the LightningModule's submodules, so Lightning neither wraps it nor moves it to the CPU at
   teardown; the module moves it to the rank's root device in ``setup`` if it is not there.
3. Windows are split into contiguous blocks of whole batches (``rank_block``), so every forward pass sees the same
   windows as in a 1-process run: on CPU the targets are bit-identical. Rank r writes
   ``shard-r{r}-{k:05d}.safetensors`` and ``progress-r{r}.json`` into ``<targets>.partial/``; a killed run rerun with
   the same command (and process layout) resumes each rank after its last complete shard.
4. After a barrier, rank 0 lists all ranks' shards in window order in one manifest.json and renames the folder into
   place. Ranks > 0 then exit (status 0): the rest of the pipeline runs in rank 0 alone, with the DDP environment
   variables restored so that a later Lightning stage (trainer=ddp) can launch its own processes.

Under torchrun or SLURM, which start every process themselves, ranks > 0 likewise leave after the collection: run
the collection as its own job (stages.fit=false stages.evaluate=false), then the later stages.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import sys
import time
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError
from .collect import build_manifest, checked_setup
from .config import TargetsConfig
from .score import batch_step, score_rows
from .store import (ShardWriter, check_work, locked, make_work_dir, prepare_work, progress_records, publish,
                    read_record)

log = logging.getLogger("shadowsparse")
DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "OMP_NUM_THREADS")
BARRIER_TIMEOUT = timedelta(hours=12)  # ranks that resumed further along wait at the final barrier for the others


def validate_collect(cfg: TargetsConfig, llm_device: str) -> None:
    """Config checks of a collection, before any model is loaded."""
    cfg.validate()
    if cfg.world_size == 1:
        return
    if _hydra_multirun():  # Lightning re-runs sys.argv per rank: each rank would start the whole sweep again
        raise ConfigError("targets.devices > 1 inside a Hydra sweep (-m): collect once without -m first (same "
                          "overrides, stages.fit=false stages.evaluate=false), then sweep: the jobs reuse the targets")
    if llm_device == "auto":
        raise ConfigError("targets.devices > 1 gives every DDP rank a whole model, but llm.device=auto splits one "
                          "model over all GPUs; use llm.device=cuda (the model fits one GPU) or targets.devices=1")
    gpu = cfg.accelerator in ("gpu", "cuda")
    if not gpu and llm_device != "cpu":
        raise ConfigError(f"targets.accelerator=cpu runs every rank's model on the CPU, but llm.device={llm_device}; "
                          "set targets.accelerator=gpu, or llm.device=cpu")
    if gpu and torch.cuda.device_count() < cfg.devices:
        raise ConfigError(f"targets.devices={cfg.devices} GPUs per node requested, {torch.cuda.device_count()} "
                          "visible; lower targets.devices, or use targets.accelerator=cpu")


def _hydra_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:
        return False
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def bind_rank_device() -> None:
    """In a process Lightning launched as local rank r, make "cuda" mean cuda:r before the model loads, so each
    rank's model lands on its own GPU (not all on GPU 0)."""
    local = os.environ.get("LOCAL_RANK")
    if local is not None and torch.cuda.is_available():
        torch.cuda.set_device(int(local) % torch.cuda.device_count())


def rank_block(n_windows: int, step: int, rank: int, world: int) -> tuple[int, int]:
    """Windows [lo, hi) of ``rank``: a contiguous run of whole batches of ``step`` windows (the last batch of the
    collection may be short, as in a 1-process run); earlier ranks get the smaller share."""
    n_batches = math.ceil(n_windows / step)
    b0, b1 = rank * n_batches // world, (rank + 1) * n_batches // world
    return min(b0 * step, n_windows), min(b1 * step, n_windows)


def ddp_layout(n_windows: int, step: int, world: int) -> dict[str, dict]:
    """progress-r{r}.json -> the fields that tie it to this process layout (see store.prepare_work)."""
    return {f"progress-r{r}.json": {"world_size": world, "rank": r,
                                    "windows": list(rank_block(n_windows, step, r, world))} for r in range(world)}


class _Starts(Dataset):
    """The first window of each batch this rank scores (a batch of 1: the DataLoader yields plain ints)."""

    def __init__(self, starts: list[int]):
        self.starts = starts

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> int:
        return self.starts[i]


class CollectModule(L.LightningModule):
    """predict_step scores one batch of windows (score.score_rows -> score_window) and hands the rows to this
    rank's ShardWriter. Holds no parameters of its own."""

    def __init__(self, model, windows, cfg: TargetsConfig, crit, view, work: Path, identity: dict, overwrite: bool):
        super().__init__()
        self.__dict__["llm"] = model  # not a submodule: Lightning must not move it to the CPU at teardown
        self.windows, self.cfg, self.crit, self.view = windows, cfg, crit, view
        self.work, self.identity, self.overwrite = work, identity, overwrite
        self.step = batch_step(windows, cfg)
        self.k = cfg.topk(view.dims.ffn)
        self.lock = contextlib.ExitStack()  # rank 0 holds the work folder's lock from setup to publish
        self.writer: ShardWriter | None = None
        self.starts: list[int] = []
        # a rank may have nothing (left) to score: its block done before a kill, or fewer batches than ranks
        self.allow_zero_length_dataloader_with_multiple_devices = True
        self.owns_work = False

    def setup(self, stage: str) -> None:
        strategy, rank, world = self.trainer.strategy, self.trainer.global_rank, self.trainer.world_size
        layout = ddp_layout(len(self.windows), self.step, world)
        error = None
        if rank == 0:  # one process prepares the shared folder (verifies, truncates, deletes) while the others wait
            try:
                self.lock.enter_context(locked(self.work))
                self.owns_work = True  # from here a failure may clean the folder up: no other run is using it
                prepare_work(self.work, self.identity, layout, self.overwrite)
            except ConfigError as exc:
                error = str(exc)
        error = strategy.broadcast(error, src=0)  # also the barrier after the preparation
        if error:
            raise ConfigError(error)
        name = f"progress-r{rank}.json"
        shards = read_record(self.work / name)["shards"]
        lo, hi = layout[name]["windows"]
        resumed = shards[-1]["windows"][1] if shards else lo
        if shards:
            log.info("targets: rank %d resumes after %d complete shards (window %d of [%d, %d))", rank, len(shards),
                     resumed, lo, hi)
        self.block, self.resumed = (lo, hi), resumed
        self.writer = ShardWriter(self.work, name, {"identity": self.identity, **layout[name]}, shards, resumed,
                                  self.cfg.shard_tokens, rank=rank)
        self.starts = list(range(resumed, hi, self.step))
        self.home = next(self.llm.parameters()).device
        self.llm.to(strategy.root_device)  # a no-op where the model was loaded on this rank's device
        log.info("targets: rank %d of %d scores windows [%d, %d) on %s (model loaded on %s)", rank, world, resumed,
                 hi, strategy.root_device, self.home)

    def predict_dataloader(self):
        return DataLoader(_Starts(self.starts), batch_size=None)

    def predict_step(self, start: int, batch_idx: int):
        self.writer.add(*score_rows(self.llm, self.crit, self.windows, int(start), self.cfg, self.k,
                                    self.trainer.strategy.root_device))


def collect_distributed(model, windows, cfg: TargetsConfig, out_dir: str | Path, data_desc: str = "",
                        seed: int = 0, overwrite: bool = False) -> Path:
    """collect.collect over ``cfg.devices`` x ``cfg.num_nodes`` Lightning DDP ranks: the same targets (rows, order,
    values) as a 1-process collection, in per-rank shards. Returns out_dir in rank 0; ranks > 0 exit when done."""
    crit, view, out_dir, work, identity = checked_setup(model, windows, cfg, out_dir, data_desc, seed)
    step = batch_step(windows, cfg)
    check_work(work, identity, ddp_layout(len(windows), step, cfg.world_size), overwrite)  # refuse before launching
    make_work_dir(work)
    module = CollectModule(model, windows, cfg, crit, view, work, identity, overwrite)
    from lightning.pytorch.strategies import DDPStrategy
    trainer = L.Trainer(accelerator="gpu" if cfg.accelerator in ("gpu", "cuda") else "cpu", devices=cfg.devices,
                        num_nodes=cfg.num_nodes, strategy=DDPStrategy(timeout=BARRIER_TIMEOUT), logger=False,
                        enable_checkpointing=False, enable_model_summary=False, inference_mode=False,
                        use_distributed_sampler=False, default_root_dir=str(work.parent))
    saved_env, threads = {k: os.environ.get(k) for k in DDP_ENV}, torch.get_num_threads()
    t0 = time.time()
    try:
        trainer.predict(module, return_predictions=False)
        module.writer.flush(module.block[1])  # the rank's last shard ends at its block's end
        resumed: list = [None] * trainer.world_size  # gathering it is also the barrier before the merge
        torch.distributed.all_gather_object(resumed, module.resumed)
        if trainer.global_rank == 0:
            _merge(module, trainer.world_size, out_dir, model, windows, cfg, view, data_desc, seed, resumed,
                   time.time() - t0)
    except BaseException:
        if module.owns_work and work.is_dir() and \
                not any(r and r.get("shards") for r in progress_records(work).values()):
            shutil.rmtree(work, ignore_errors=True)  # nothing complete to resume from: leave no partial artifact
        raise
    finally:
        module.lock.close()
        rank = trainer.global_rank
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for k, v in saved_env.items():  # a later Lightning stage launches its own processes from a clean slate
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        torch.set_num_threads(threads)
    if rank != 0:
        log.info("targets: rank %d done; leaving (rank 0 runs the later stages)", rank)
        sys.stdout.flush()
        sys.exit(0)
    model.to(module.home)
    return out_dir


def _merge(module: CollectModule, world: int, out_dir: Path, model, windows, cfg, view, data_desc, seed,
           resumed: list[int], seconds: float):
    """Rank 0, after every rank flushed: one manifest listing all ranks' shards in global window order."""
    work, shards, ranks = module.work, [], []
    layout = ddp_layout(len(windows), module.step, world)
    for r in range(world):
        name = f"progress-r{r}.json"
        rec = read_record(work / name)
        lo, hi = layout[name]["windows"]
        got = rec["shards"] if rec else []
        end = got[-1]["windows"][1] if got else lo
        if end != hi or (got and got[0]["windows"][0] != lo):
            raise RuntimeError(f"rank {r} recorded windows up to {end} of its block [{lo}, {hi}) in {work / name}; "
                               "rerun the same command to resume")
        shards += got
        ranks.append({"rank": r, "windows": [lo, hi], "shards": len(got), "resumed_at_window": resumed[r]})
    n_rows = sum(s["rows"] for s in shards)
    manifest = build_manifest(model, windows, cfg, view, shards, n_rows, data_desc, seed, seconds,
                              resumed_at_window=resumed, world_size=world, ranks=ranks,
                              accelerator=cfg.accelerator)  # resumed_at_window: per rank (its block's start: fresh)
    publish(work, out_dir, manifest)
    log.info("targets: %d ranks wrote %d shards, %d rows in %.0f s", world, len(shards), n_rows, seconds)
