"""The resumable work folder of a collection and the finished targets folder it becomes.

Shards are written one by one into ``<targets>.partial/`` (atomic renames, each followed by its progress record:
windows covered, bytes, sha256), under an flock, so a killed collection resumes after its last complete shard;
``publish`` writes manifest.json and renames the folder into place. The 1-process driver (collect.py) and the DDP
ranks (collect_dp.py) share this code; the layout is docs/targets-format.md."""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import ConfigError

MANIFEST = "manifest.json"
PROGRESS = "progress.json"  # in the work folder: the complete shards so far
WORK_SUFFIX = ".partial"  # <targets>.partial/ holds an unfinished collection
log = logging.getLogger("shadowsparse")


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 4 MiB chunks (shards can be GBs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def work_dir_for(out_dir: Path) -> Path:
    """Where an unfinished collection keeps its complete shards: next to the targets folder, so the final rename
    stays on one filesystem."""
    return out_dir.with_name(out_dir.name + WORK_SUFFIX)


def _atomic_write(path: Path, write) -> None:
    """write(tmp) then rename over ``path``: a kill leaves the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename must not reach the disk before the bytes do
    finally:
        os.close(fd)
    os.replace(tmp, path)


def shard_problem(path: Path, shard: dict) -> str | None:
    """Why a shard on disk is not the one its record describes (missing, truncated, corrupted), or None."""
    if not path.is_file():
        return "is missing"
    size = path.stat().st_size
    if shard.get("bytes") is not None and size != shard["bytes"]:
        return f"is truncated or overwritten ({size} bytes, {shard['bytes']} recorded)"
    if file_sha256(path) != shard["sha256"]:
        return "is corrupted (its sha256 does not match the record)"
    return None


@contextmanager
def locked(folder: Path):
    """An exclusive lock on the work folder: two runs filling one folder would interleave their shards. The kernel
    drops it when the process dies, kill -9 included, so a rerun is never locked out by a dead run."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another process is collecting into '{folder}'; wait for it to finish, or give this "
                              "run its own paths.targets_dir") from None
        yield
    finally:
        os.close(fd)


def read_record(path: Path) -> dict | None:
    """The progress record at ``path`` (which must exist), or None when it does not parse."""
    try:
        return json.loads(path.read_text())
    except ValueError:  # records are written atomically, so only a hand-edited one gets here: nothing to resume
        return None


def _layout_name(rec: dict) -> str:
    ws = rec.get("world_size")
    return f"{ws}-process collection (targets.devices x targets.num_nodes = {ws})" if ws else \
        "1-process collection (targets.devices=1)"


def progress_records(work: Path) -> dict[str, dict | None]:
    """Every progress record in ``work`` (progress.json, or progress-r{r}.json per DDP rank) by file name."""
    return {f.name: read_record(f) for f in sorted(work.glob("progress*.json"))} if work.is_dir() else {}


def check_work(work: Path, identity: dict, layout: dict[str, dict], overwrite: bool) -> None:
    """Refuse a work folder holding complete shards of another configuration or process layout (unless
    ``overwrite``); reads only, so every DDP process can check before any is launched."""
    for name, rec in progress_records(work).items():
        if not rec or not rec.get("shards") or overwrite:  # refuse only where there is work to lose
            continue
        if rec.get("identity") != identity:
            differ = sorted(k for k in identity if rec.get("identity", {}).get(k) != identity[k])
            raise ConfigError(f"'{work}' holds an interrupted collection of another configuration (differs in "
                              f"{differ}); rerun with targets_overwrite=true to discard it and collect afresh, "
                              "or point paths.targets_dir elsewhere")
        if name not in layout or any(rec.get(k) != v for k, v in layout[name].items()):
            raise ConfigError(f"'{work}' holds an interrupted {_layout_name(rec)} of this configuration; rerun "
                              "with that process layout to resume it, or with targets_overwrite=true to discard it")


def prepare_work(work: Path, identity: dict, layout: dict[str, dict], overwrite: bool) -> dict[str, list[dict]]:
    """Make the work folder ready for a run whose progress records are ``layout`` (record file name -> the fields
    it carries besides the identity: {} for one process; world_size, rank and windows for DDP rank r); the caller
    holds the folder's lock. Returns, per record, the complete shards an interrupted run of this very configuration
    and process layout left. Before anything is changed, a folder holding complete shards of another configuration
    or another process layout is refused unless ``overwrite`` (check_work). Then shards after a record's first bad
    one, and files no record names (a shard killed before its record was written), are deleted so the run
    recomputes them."""
    check_work(work, identity, layout, overwrite)  # decide first: a refusal leaves the folder untouched
    records = progress_records(work)
    kept: dict[str, list[dict]] = {}
    for name, extra in layout.items():
        rec, shards = records.get(name), []
        if rec and rec.get("identity") == identity and all(rec.get(k) == v for k, v in extra.items()):
            for shard in rec.get("shards", []):
                problem = shard_problem(work / shard["file"], shard)
                if problem:
                    log.warning("targets: shard %s %s; recomputing from window %d", shard["file"], problem,
                                shard["windows"][0])
                    break
                shards.append(shard)
        kept[name] = shards
    if any(rec and rec.get("shards") for name, rec in records.items()
           if name not in layout or rec.get("identity") != identity):
        log.warning("targets: discarding the interrupted collection of another configuration or layout in %s", work)
    keep = {s["file"] for shards in kept.values() for s in shards}
    for f in work.iterdir():
        if f.name not in keep:
            f.unlink()
    for name, extra in layout.items():
        _write_record(work / name, {"identity": identity, **extra, "shards": kept[name]})
    return kept


def _write_record(path: Path, record: dict) -> None:
    _atomic_write(path, lambda p: p.write_text(json.dumps(record, indent=1)))


def recorded_bytes(work: Path, identity: dict) -> int:
    """Bytes of the shards an interrupted run of this configuration recorded in ``work`` (unverified: only for the
    disk-space estimate, made before the folder is locked)."""
    if not work.is_dir():
        return 0
    recs = [read_record(f) for f in work.glob("progress*.json")]
    return sum(s.get("bytes") or 0 for r in recs if r and r.get("identity") == identity for s in r.get("shards", []))


def make_work_dir(work: Path) -> None:
    """Create the work folder, or refuse naming the keys that move it (a read-only or missing cache)."""
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the targets work folder '{work}' ({exc.strerror}); point paths.cache_dir "
                          "or paths.targets_dir at a writable folder") from exc


class ShardWriter:
    """Buffers the encoded rows of consecutive windows and writes them as shards into the work folder, each shard
    followed by its progress record: a kill between the two leaves an unrecorded shard, recomputed on resume.
    A shard ends at the first window that brings it to ``shard_tokens`` rows, so where shards end depends only on
    the windows: a resumed run cuts them where an uninterrupted one does."""

    def __init__(self, work: Path, record: str, header: dict, shards: list[dict], first: int, shard_tokens: int,
                 rank: int | None = None):
        self.work, self.record, self.header, self.shards = work, record, header, shards
        self.first, self.shard_tokens, self.rank = first, shard_tokens, rank
        self.prefix = "shard-" if rank is None else f"shard-r{rank}-"  # per-rank names: ranks never collide
        self.buf: dict[str, list[torch.Tensor]] = {}
        self.buffered = 0
        self.n_rows = sum(s["rows"] for s in shards)

    def add(self, rows: dict[str, torch.Tensor], end: int) -> None:
        """rows: encode_rows() of the windows up to ``end`` (exclusive)."""
        for key, t in rows.items():
            self.buf.setdefault(key, []).append(t)
        n = rows["features"].shape[0]
        self.n_rows += n
        self.buffered += n
        if self.buffered >= self.shard_tokens:
            self.flush(end)

    def flush(self, end: int) -> None:
        if not self.buffered:
            return
        name = f"{self.prefix}{len(self.shards):05d}.safetensors"
        tensors = {k: torch.cat(v).contiguous() for k, v in self.buf.items()}
        path = self.work / name
        _atomic_write(path, lambda p: save_file(tensors, str(p)))
        entry = {"file": name, "rows": tensors["features"].shape[0], "bytes": path.stat().st_size,
                 "sha256": file_sha256(path), "windows": [self.first, end]}
        if self.rank is not None:
            entry["rank"] = self.rank
        self.shards.append(entry)
        _write_record(self.work / self.record, {**self.header, "shards": self.shards})
        self.buf.clear()
        self.buffered, self.first = 0, end


def publish(work: Path, out_dir: Path, manifest: dict) -> None:
    """Write the manifest into the complete work folder and rename it into place (the caller holds its lock)."""
    _atomic_write(work / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=2)))
    if out_dir.exists():  # targets_overwrite: the old folder goes only once the new one is complete
        shutil.rmtree(out_dir)
    work.rename(out_dir)  # a kill before this line leaves a complete work folder: a rerun just renames it
    for f in out_dir.glob("progress*.json"):
        f.unlink()


def read_manifest(targets_dir: str | Path) -> dict:
    """A finished collection's manifest.json (docs/targets-format.md)."""
    path = Path(targets_dir) / MANIFEST
    if not path.exists():
        raise ConfigError(f"no targets at '{targets_dir}' ({MANIFEST} missing); run the collect stage first "
                          "(stages.collect=true) or point targets_dir at a finished collection")
    return json.loads(path.read_text())
