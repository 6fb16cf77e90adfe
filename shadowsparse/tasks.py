"""Zero-shot tasks through lm-evaluation-harness, offline, on the in-memory (gated) model.

The shipped copies under data/tasks/ are made once from the project's shared data by ``convert_all`` (one JSON
object per question: ``query``, ``choices``, ``gold``; WinoGrande carries ``contexts`` and ``continuation`` for
lm-eval's partial scoring). Prompts follow lm-eval's own task definitions. Tasks are handed to lm-eval as dict
configs that read those local files, so nothing touches the network:

    python -m shadowsparse.tasks convert ../shared/data data/tasks    # regenerate the shipped copies
"""
from __future__ import annotations

import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from .data import resolve
from .errors import ConfigError

TASKS = ("copa", "arc_easy", "openbookqa", "winogrande", "hellaswag", "rte", "boolq")
METRICS = {"copa": ("acc",), "winogrande": ("acc",), "rte": ("acc",), "boolq": ("acc",),
           "arc_easy": ("acc", "acc_norm"), "openbookqa": ("acc", "acc_norm"), "hellaswag": ("acc", "acc_norm")}
HELLASWAG_KEEP = 2000  # items shipped of the 10,042 (the full file is 7.5 MB)


# -- conversion (run once; its output is committed) ---------------------------------------------------------------
def _copa(src: Path):
    gold = {}
    for line in (src / "results" / "gold.dev").read_text().split("\n"):
        if line.strip():
            i, a1, _ = line.split()
            gold[i] = 0 if a1 == "1" else 1
    for item in ET.parse(src / "copa-dev.xml").getroot():
        connector = {"cause": " because", "effect": " therefore"}[item.get("asks-for")]
        premise = item.find("p").text.strip()
        alts = [item.find(a).text.strip() for a in ("a1", "a2")]
        yield {"query": premise[:-1] + connector, "choices": [a[0].lower() + a[1:] for a in alts],
               "gold": gold[item.get("id")]}


def _multiple_choice(path: Path, text):
    for line in path.read_text().splitlines():
        d = json.loads(line)
        labels = [c["label"] for c in d["question"]["choices"]]
        yield {"query": text(d["question"]["stem"]), "choices": [c["text"] for c in d["question"]["choices"]],
               "gold": labels.index(d["answerKey"].strip())}


def _winogrande(src: Path):
    for line in (src / "dev.jsonl").read_text().splitlines():
        d = json.loads(line)
        cut = d["sentence"].index("_")
        yield {"contexts": [d["sentence"][:cut] + d[o] for o in ("option1", "option2")],
               "continuation": d["sentence"][cut + 1:].strip(), "gold": int(d["answer"]) - 1}


def _hellaswag_clean(text: str) -> str:  # lm-eval's hellaswag preprocessing
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(src: Path):
    lines = (src / "hellaswag_val_full.txt").read_text().split("\n")
    for i in range(0, min(len(lines) - 5, 6 * HELLASWAG_KEEP), 6):
        yield {"query": _hellaswag_clean(lines[i]), "choices": [_hellaswag_clean(e) for e in lines[i + 2:i + 6]],
               "gold": int(lines[i + 1])}


def _rte(src: Path):
    for line in (src / "val.jsonl").read_text().splitlines():
        d = json.loads(line)
        yield {"query": f"{d['premise']}\nQuestion: {d['hypothesis']} True or False?\nAnswer:",
               "choices": ["True", "False"], "gold": 0 if d["label"] == "entailment" else 1}


def _boolq(src: Path):
    for line in (src / "boolq_val_parsed.jsonl").read_text().splitlines():
        d = json.loads(line)
        yield {"query": f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:", "choices": ["no", "yes"],
               "gold": int(d["label"])}


CONVERTERS = {
    "copa": lambda root: _copa(root / "copa"),
    "arc_easy": lambda root: _multiple_choice(root / "arc_easy" / "ARC-Easy-Test.jsonl",
                                              lambda q: f"Question: {q}\nAnswer:"),
    "openbookqa": lambda root: _multiple_choice(root / "openbookqa" / "test.jsonl", lambda q: q),
    "winogrande": lambda root: _winogrande(root / "winogrande"),
    "hellaswag": lambda root: _hellaswag(root / "hellaswag"),
    "rte": lambda root: _rte(root / "superglue_rte"),
    "boolq": lambda root: _boolq(root / "boolq"),
}
SOURCES = {"copa": "copa", "arc_easy": "arc_easy", "openbookqa": "openbookqa", "winogrande": "winogrande",
           "hellaswag": "hellaswag", "rte": "superglue_rte", "boolq": "boolq"}


def convert_all(shared: str | Path, out: str | Path) -> dict[str, int]:
    shared, out = Path(shared), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name in TASKS:
        rows = list(CONVERTERS[name](shared))
        tmp = out / f"{name}.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        tmp.rename(out / f"{name}.jsonl")
        source_md = (shared / SOURCES[name] / "SOURCE.md").read_text()
        (out / f"{name}.SOURCE.md").write_text(
            source_md + f"\n\n## Shipped in shadowsparse\n`{name}.jsonl`: {len(rows)} items converted by "
            "`python -m shadowsparse.tasks convert` into query/choices/gold (prompts as in lm-eval's task)"
            + (f"; the first {HELLASWAG_KEEP} items only." if name == "hellaswag" else ".") + "\n")
        counts[name] = len(rows)
    return counts


# -- lm-eval task configs -------------------------------------------------------------------------------------------
def _wg_text(doc):  # partial scoring: the context that is right is chosen by index...
    return doc["gold"]


def _wg_choice(doc):  # ...among the two sentence prefixes, each scored on the same continuation
    return doc["contexts"]


def _wg_target(doc):
    return doc["continuation"]


def task_config(name: str, data_dir: str = "data/tasks") -> dict:
    if name not in TASKS:
        raise ConfigError(f"unknown task '{name}'; shipped tasks are {list(TASKS)}")
    path = Path(resolve(data_dir)) / f"{name}.jsonl"
    if not path.exists():
        raise ConfigError(f"task data '{path}' is missing; run `python -m shadowsparse.tasks convert "
                          "../shared/data data/tasks`")
    cfg = {"task": f"shadowsparse_{name}", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(path)}},
           "test_split": "test", "output_type": "multiple_choice",
           "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in METRICS[name]]}
    if name == "winogrande":
        cfg.update(doc_to_text=_wg_text, doc_to_choice=_wg_choice, doc_to_target=_wg_target)
    else:
        cfg.update(doc_to_text="{{query}}", doc_to_choice="{{choices}}", doc_to_target="{{gold}}")
    return cfg


def task_examples(tokenizer, name: str, n: int | None, data_dir: str = "data/tasks") -> list[tuple]:
    """The first n examples (None: all) of a task as (ids (T,), answer_mask (T,)): the prompt lm-eval scores, the
    gold answer after lm-eval's " " delimiter, and a mask on the answer tokens — the loss of gradient criteria on
    task data."""
    import torch
    cfg = task_config(name, data_dir)  # validates the name and the file
    path = cfg["dataset_kwargs"]["data_files"]["test"]
    out = []
    with open(path) as f:
        for line in f:
            if n is not None and len(out) >= n:
                break
            d = json.loads(line)
            context, answer = ((d["contexts"][d["gold"]], d["continuation"]) if "contexts" in d
                               else (d["query"], d["choices"][d["gold"]]))
            ctx = tokenizer.encode(context, add_special_tokens=False)
            ans = tokenizer.encode(" " + answer, add_special_tokens=False)
            out.append((torch.tensor(ctx + ans), torch.tensor([False] * len(ctx) + [True] * len(ans))))
    if not out:
        raise ConfigError(f"task '{name}' gave no examples; raise data.calib.n_windows")
    return out


def evaluate_tasks(model, tokenizer, names: list[str], limit: int | None = None, batch_size: int = 8,
                   data_dir: str = "data/tasks") -> dict[str, dict]:
    """{task: {"acc": .., "acc_norm": .., "n": ..}} of the model as it is now (gating hooks included)."""
    import logging

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(next(model.parameters()).device))
    out = simple_evaluate(model=lm, tasks=[task_config(n, data_dir) for n in names], limit=limit,
                          log_samples=False, verbosity="WARNING")
    results = {}
    for n in names:
        r = out["results"][f"shadowsparse_{n}"]
        results[n] = {m: float(r[f"{m},none"]) for m in METRICS[n]}
        results[n]["n"] = int(out["n-samples"][f"shadowsparse_{n}"]["effective"])
    return results


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] != "convert":
        print("usage: python -m shadowsparse.tasks convert <shared data dir> <out dir>", file=sys.stderr)
        return 2
    for name, n in convert_all(argv[1], argv[2]).items():
        print(f"{name}: {n} items")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
