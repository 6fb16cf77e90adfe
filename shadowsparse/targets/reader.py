"""Reading finished targets: TargetsReader streams rows out of the memory-mapped shards (top-k neurons decoded to
dense, so every reader sees one format); mean_scores and load_targets are built on it."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConfigError
from ..llm import check_fingerprint
from .config import NEURON_FILL, decode_neurons
from .store import read_manifest, shard_problem

ALL_KEYS = ("features", "heads", "neurons", "layer_inputs")


class TargetsReader:
    """Rows of a targets/ folder, read on demand from memory-mapped shards (safetensors ``safe_open``): opening it
    reads only the manifest and the shard headers; ``rows(key, a, b)`` copies rows [a, b) out of the shards they lie
    in and nothing else. Top-k neuron shards are decoded to dense (N, L, F) here (decode_neurons), so readers see
    one format. The global row order is the manifest's shard order (window order, whatever the number of ranks)."""

    MAX_OPEN = 8  # open shard handles kept (each an mmap; pages are the kernel's cache, not this process' heap)

    def __init__(self, targets_dir: str | Path, model=None, verify: bool | list[int] = True,
                 keys: tuple[str, ...] = ALL_KEYS):
        """verify: True checks every shard's size and sha256 (reads each file once, streaming), a list only those
        shard indices (DDP ranks split the work), False none."""
        self.dir = Path(targets_dir)
        self.manifest = m = read_manifest(self.dir)
        if model is not None:
            check_fingerprint(m["model"], model, f"targets at '{self.dir}'")
        self.keys, self.ffn = keys, m["ffn"]
        self.topk = m.get("neuron_topk") if m.get("neuron_encoding") == "topk" else None
        self.fill = m.get("neuron_fill") or NEURON_FILL
        self.shards = m["shards"]
        self.starts = [0]
        for s in self.shards:  # row offset of each shard: shard i holds rows [starts[i], starts[i+1])
            self.starts.append(self.starts[-1] + s["rows"])
        self.n_rows = self.starts[-1]
        self._open: dict[int, object] = {}
        self.rows_read = 0  # rows copied out so far (tests check that reading streams)
        check = range(len(self.shards)) if verify is True else (verify or [])
        for i in check:
            path = self.dir / self.shards[i]["file"]
            problem = shard_problem(path, self.shards[i])
            if problem:
                raise ConfigError(f"targets shard '{path}' {problem}; re-collect with targets_overwrite=true "
                                  "(or delete the targets folder and rerun)")
        if self.shards:
            stored = set(self._handle(0).keys())
            need = {("neuron_idx" if k == "neurons" and self.topk else k) for k in keys}
            missing = need - stored
            if "layer_inputs" in missing and m.get("layer_inputs") is False:
                raise ConfigError(f"targets at '{self.dir}' were collected with targets.layer_inputs=false; the "
                                  "per-layer predictor reads them: re-collect with targets.layer_inputs=true "
                                  "targets_overwrite=true, or use predictor=shared")
            if missing:
                raise ConfigError(f"targets at '{self.dir}' lack {sorted(missing)} (collected by an older version); "
                                  "re-collect them with targets_overwrite=true")

    def _handle(self, i: int):
        from safetensors import safe_open
        if i not in self._open:
            if len(self._open) >= self.MAX_OPEN:
                self._open.pop(next(iter(self._open)))  # the oldest; its mmap closes with it
            self._open[i] = safe_open(str(self.dir / self.shards[i]["file"]), framework="pt")
        return self._open[i]

    def shard_of(self, row: int) -> int:
        import bisect
        return bisect.bisect_right(self.starts, row) - 1

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of ``key`` ("features" (n, d), "heads" (n, L, H), "neurons" (n, L, F), "layer_inputs"
        (n, L, d)) in their stored dtype."""
        parts = []
        i = self.shard_of(start)
        while start < stop:
            a, b = start - self.starts[i], min(stop, self.starts[i + 1]) - self.starts[i]
            f = self._handle(i)
            if key == "neurons" and self.topk:
                parts.append(decode_neurons(f.get_slice("neuron_idx")[a:b], f.get_slice("neuron_val")[a:b], self.ffn,
                                            self.fill))
            else:
                parts.append(f.get_slice(key)[a:b])
            start = self.starts[i + 1]
            i += 1
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        self.rows_read += out.shape[0]
        return out

    def close(self) -> None:
        self._open.clear()


def mean_scores(targets_dir: str | Path, model=None, chunk_rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean head (L, H) and neuron (L, F) scores over every row (what a static mask ranks), streamed a chunk of
    ``chunk_rows`` at a time with float64 sums: memory holds one chunk, not the (N, L, F) neuron scores."""
    reader = TargetsReader(targets_dir, model, verify=False, keys=("heads", "neurons"))
    sums = {"heads": 0.0, "neurons": 0.0}
    for i in range(len(reader.shards)):
        for a in range(reader.starts[i], reader.starts[i + 1], chunk_rows):
            b = min(a + chunk_rows, reader.starts[i + 1])
            for key in sums:
                sums[key] = sums[key] + reader.rows(key, a, b).double().sum(0)
    reader.close()
    n = max(1, reader.n_rows)
    return (sums["heads"] / n).float(), (sums["neurons"] / n).float()


def load_targets(targets_dir: str | Path, model=None, verify: bool = True,
                 keys: tuple[str, ...] = ALL_KEYS) -> tuple[dict, dict]:
    """(manifest, {"features": (N, d), "heads": (N, L, H), "neurons": (N, L, F), "layer_inputs": (N, L, d)}), only
    the requested keys, all in memory (top-k neurons decoded to dense); refuses another model's targets and corrupt
    shards. Training streams instead (system.TargetsDataModule over TargetsReader)."""
    reader = TargetsReader(targets_dir, model, verify=verify, keys=keys)
    out = {k: torch.cat([reader.rows(k, reader.starts[i], reader.starts[i + 1]) for i in range(len(reader.shards))])
           for k in keys}
    reader.close()
    return reader.manifest, out
