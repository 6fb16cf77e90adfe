"""Text sources -> fixed-length token windows, through the `datasets` library (local json/text/parquet files are
also read without it, on hosts that lack it).

A source is a ``datasets`` spec: a builder (``json``, ``text``, ``parquet``, ...) with ``data_files``, or a hub name
with ``name``/``split``. Documents are joined with ``separator`` into one stream, tokenized once, and cut into
non-overlapping windows of ``seq_len`` tokens — the standard perplexity protocol for WikiText-2.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import ConfigError


@dataclass
class TextSource:
    path: str = "json"  # datasets builder ("json", "text", "parquet") or a hub dataset name
    data_files: str | None = None  # local file(s) for a builder; relative paths resolve against the project root
    name: str | None = None  # hub config name, e.g. "wikitext-2-raw-v1"
    split: str = "train"  # split to read
    text_field: str = "text"  # column holding the text
    separator: str = "\n\n"  # joins documents into one stream
    sample_by: str | None = None  # "document" keeps a whole text file as one example (datasets 'text' builder)
    max_chars: int | None = None  # stop reading once this many characters are collected (bounds tokenizing time)


@dataclass
class WindowSpec:
    seq_len: int = 512  # tokens per window
    n_windows: int | None = 32  # how many windows to keep (from the start of the stream); None keeps all
    source: TextSource = field(default_factory=TextSource)


def project_root() -> Path:
    return Path(__file__).resolve().parent.parent


def resolve(path: str) -> str:
    p = Path(path).expanduser()
    if not p.is_absolute():
        p = project_root() / p
    return str(p)


_SPLIT_PART = re.compile(r"^\s*(\w+)\s*(?:\[\s*(-?\d+%?)?\s*:\s*(-?\d+%?)?\s*\])?\s*$")


def select_split(docs: list, split: str) -> list:
    """The documents a ``datasets`` split string selects from a local file's (which has the one split "train"):
    ``train``, slices ``train[a:b]`` (counts, negative counts or percents, as datasets reads them) and parts joined
    with ``+`` (``train[:1000]+train[1100:]``). Without it, a host lacking datasets would read the whole file
    whatever the split said: a held-out screen (``experiment=heldout_c4``) would score the calibration text."""
    out: list = []
    for part in split.split("+"):
        m = _SPLIT_PART.match(part)
        if m is None or m.group(1) != "train":
            raise ConfigError(f"split '{split}' of a local file: use 'train', a slice such as 'train[1000:]' or "
                              "'train[:10%]', or slices joined with '+' (a local file has only the split 'train')")

        def bound(v):
            if v is None:
                return None
            return round(int(v[:-1]) * len(docs) / 100) if v.endswith("%") else int(v)
        out.extend(docs[bound(m.group(2)):bound(m.group(3))])
    return out


def _local_texts(src: TextSource, files: str) -> list:
    """The documents of a local file without the ``datasets`` library, as its builders would yield them: ``json``
    (JSON lines, or one JSON array) -> the ``text_field`` of each object; ``text`` -> lines, paragraphs or the whole
    document (``sample_by``); ``parquet`` -> the column (pyarrow); then the documents ``split`` selects
    (select_split). Only for hosts without ``datasets`` (a GPU box that gets its packages as wheels): datasets stays
    the normal path."""
    return select_split(_local_docs(src, files), src.split)


def _local_docs(src: TextSource, files: str) -> list:
    path = Path(files)
    if src.path == "json":
        raw = path.read_text(encoding="utf-8")
        if raw.lstrip().startswith("["):  # one JSON array
            docs = json.loads(raw)
        else:  # JSON lines
            docs = [json.loads(x) for x in raw.splitlines() if x.strip()]
        if docs and src.text_field not in docs[0]:
            raise ConfigError(f"text source has no column '{src.text_field}'; columns are {sorted(docs[0])}")
        return [d.get(src.text_field) for d in docs]
    if src.path == "text":
        raw = path.read_text(encoding="utf-8")
        if src.sample_by == "document":
            return [raw]
        if src.sample_by == "paragraph":
            return [p for p in raw.split("\n\n")]
        return raw.splitlines()
    if src.path == "parquet":
        import pyarrow.parquet as pq
        table = pq.read_table(path)
        if src.text_field not in table.column_names:
            raise ConfigError(f"text source has no column '{src.text_field}'; columns are {table.column_names}")
        return table.column(src.text_field).to_pylist()
    raise ConfigError(f"reading '{src.path}' needs the 'datasets' library, which is not installed: "
                      "`pip install datasets`, or give a local json, text or parquet file")


def read_text(src: TextSource) -> str:
    """All documents of a source joined into one string (up to ``max_chars``)."""
    try:
        import datasets
    except ImportError:
        datasets = None
    if datasets is None:
        if src.data_files is None:
            raise ConfigError(f"the hub dataset '{src.path}' needs the 'datasets' library: `pip install datasets`, or "
                              "point data_files at a local json, text or parquet file")
        files = resolve(src.data_files)
        if not Path(files).exists():
            raise ConfigError(f"data file '{files}' does not exist; point data_files at a local file "
                              "(the project ships data/ copies) or use a hub dataset name")
        return _join(src, _local_texts(src, files))
    kwargs: dict = {"split": src.split}
    if src.data_files is not None:
        files = resolve(src.data_files)
        if not Path(files).exists():
            raise ConfigError(f"data file '{files}' does not exist; point data_files at a local file "
                              "(the project ships data/ copies) or use a hub dataset name")
        kwargs["data_files"] = files
    if src.name is not None:
        kwargs["name"] = src.name
    if src.sample_by is not None:
        kwargs["sample_by"] = src.sample_by
    try:
        ds = datasets.load_dataset(src.path, **kwargs)
    except (FileNotFoundError, ValueError, ConnectionError) as exc:
        raise ConfigError(f"could not read text source '{src.path}' ({src.data_files or src.name}): {exc}") from exc
    if src.text_field not in ds.column_names:
        raise ConfigError(f"text source has no column '{src.text_field}'; columns are {ds.column_names}")
    return _join(src, ds[src.text_field])


def _join(src: TextSource, texts) -> str:
    parts, total = [], 0
    for text in texts:
        if not text:
            continue
        parts.append(text)
        total += len(text)
        if src.max_chars and total >= src.max_chars:
            break
    joined = src.separator.join(parts)
    if not joined.strip():
        raise ConfigError(f"text source '{src.data_files or src.path}' is empty; give a file or split with text")
    return joined


def check_spec(spec: WindowSpec, key: str = "") -> None:
    """Window length and count, before any text is read (``key``: the config node, for the messages)."""
    at = f"{key}." if key else ""
    if isinstance(spec.seq_len, bool) or not isinstance(spec.seq_len, int) or spec.seq_len < 2:
        raise ConfigError(f"{at}seq_len must be a number of tokens >= 2, got {spec.seq_len!r}; e.g. {at}seq_len=512")
    n = spec.n_windows
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ConfigError(f"{at}n_windows={n!r} is not a number of windows; set {at}n_windows to a count >= 1 "
                          f"(e.g. {at}n_windows=32), or to null for every window of the text")


def token_windows(tokenizer, spec: WindowSpec, key: str = "") -> torch.Tensor:
    """(N, seq_len) int64 token ids: the first ``n_windows`` non-overlapping windows of the source (all of them when
    ``n_windows`` is None). ``key`` (``data.eval``) is the config node the spec came from: messages name its keys."""
    check_spec(spec, key)
    at = f"{key}." if key else ""
    src = spec.source
    if spec.n_windows is not None and src.max_chars is None:
        # Tokenizing a whole corpus to keep a few windows is slow on CPU: read a generous character budget.
        src = TextSource(**{**src.__dict__, "max_chars": spec.n_windows * spec.seq_len * 12})
    # the whole stream at once, on purpose (cut into windows below): verbose=False drops the tokenizer's warning that
    # the sequence is longer than the model's context
    ids = tokenizer.encode(read_text(src), add_special_tokens=False, verbose=False)
    n = len(ids) // spec.seq_len
    if spec.n_windows is not None:
        n = min(n, spec.n_windows)
    if n == 0:
        where = f"{at}source ({src.data_files or src.path})" if key else "the text source"
        raise ConfigError(f"{where} holds {len(ids)} tokens, fewer than one window of {at}seq_len={spec.seq_len}; "
                          f"lower {at}seq_len (to at most {len(ids)}) or point {at}source at more text")
    return torch.tensor(ids[: n * spec.seq_len], dtype=torch.long).view(n, spec.seq_len)
