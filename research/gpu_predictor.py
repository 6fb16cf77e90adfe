"""Issue 18 goal 3 (session 13): the learned predictors at GPU scale, fitted online (shadowsparse/online_fit.py: the
LLM scores each chunk of calibration windows as the fit reads it, nothing stored), screened on held-out C4 at 50%
FFN, the pick evaluated once on the WikiText-2 test windows.

usage (repository root; on the GPU after `source .gpu/m2/env.sh`):
    python research/gpu_predictor.py OUT SAVE [runs=big,r16k,r128k] [device=cuda] [deadline=540] [KEY=VALUE ...]

students=a,b / epochs=N / seconds=S override every run's RUNS entry (S: the fit's cap in seconds); other KEY=VALUE
pairs set OnlineFitConfig fields. On CUDA each epoch's history row also carries the device memory allocated after
the epoch and the epoch's peak (online_fit logs it per chunk for the first chunks of epoch 0 only).

Calibration: the shipped C4 sample without the held-out screen's documents (split train[:1000]+train[1100:],
~0.93M tokens); screen: experiment=heldout_c4 with 64 windows (documents 1000-1090); test: the default WikiText-2
windows (32 x 512). Rows go to OUT/results.jsonl as they are made; predictors to SAVE/<run>/<student>; the picked
ones are packed into OUT/picked.tar.part* (pieces under 16 MB: `cat picked.tar.part* | tar x`).
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import torch

START = time.time()
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from shadowsparse.arch import ModelView  # noqa: E402
from shadowsparse.config import window_spec  # noqa: E402
from shadowsparse.data import token_windows  # noqa: E402
from shadowsparse.gating import scores_for  # noqa: E402
from shadowsparse.llm import LLMConfig, load_llm, load_tokenizer, model_fingerprint  # noqa: E402
from shadowsparse.online_fit import OnlineFitConfig, ffn_input_student, fit_online, shared_student  # noqa: E402
from shadowsparse.perplexity import Level, evaluate_levels  # noqa: E402
from shadowsparse.verify import VerifyScores  # noqa: E402

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
log = logging.getLogger("shadowsparse")
CALIB_SPLIT = "train[:1000]+train[1100:]"
WIDE = {"hidden": 2048, "depth": 3, "rank": 128}


def compose(*overrides: str):
    """train.yaml composed with overrides, as `python train.py ...` would."""
    from hydra import compose as hcompose, initialize_config_dir

    import shadowsparse.schema  # noqa: F401  (types conf/ groups, as train.py does)
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parent.parent / "conf"), version_base="1.3"):
        return hcompose(config_name="train", overrides=list(overrides))


def students_for(names: list[str], dims: dict, layers: list[int]):
    make = {
        "shared": lambda: shared_student("shared", dims),  # the default: 1024 x 2, rank 64, mse
        "shared_wide": lambda: shared_student("shared_wide", dims, WIDE),
        "shared_bce": lambda: shared_student("shared_bce", dims, loss="bce"),
        "shared_listnet": lambda: shared_student("shared_listnet", dims, loss="listnet"),
        "shared_wide_bce": lambda: shared_student("shared_wide_bce", dims, WIDE, loss="bce"),
        "per_layer": lambda: shared_student("per_layer", dims, {"rank": 128}, kind="per_layer"),
        "ffn_r64": lambda: ffn_input_student("ffn_r64", dims, layers, rank=64),
        "ffn_r128": lambda: ffn_input_student("ffn_r128", dims, layers, rank=128),
    }
    return [make[n]() for n in names]


RUNS = {  # name: calibration windows (None: all), epochs, students, seconds for the fit at most
    "big": dict(windows=None, epochs=8, seconds=220,
                students=["shared", "shared_wide", "shared_bce", "shared_listnet", "per_layer", "ffn_r64",
                          "ffn_r128"]),
    "r16k": dict(windows=32, epochs=20, seconds=40, students=["shared", "ffn_r64"]),
    "r128k": dict(windows=256, epochs=8, seconds=80, students=["shared", "ffn_r64"]),
    "big2": dict(windows=None, epochs=2, seconds=90, students=["shared", "ffn_r64"]),
    "smoke": dict(windows=4, epochs=1, seconds=60, students=["shared", "per_layer", "ffn_r64"]),  # a CPU check
}


def main():
    out, save = Path(sys.argv[1]), Path(sys.argv[2])
    kv = dict(a.split("=", 1) for a in sys.argv[3:])
    runs = kv.pop("runs", "big,r16k,r128k").split(",")
    device = kv.pop("device", "cuda")
    deadline = float(kv.pop("deadline", 540))
    students_override = kv.pop("students", None)
    epochs_override = kv.pop("epochs", None)
    seconds_override = kv.pop("seconds", None)
    out.mkdir(parents=True, exist_ok=True)
    save.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"

    def memory():  # device memory after an epoch and its peak (a per-chunk leak shows as a rising peak)
        if device != "cuda":
            return {}
        row = {"cuda_allocated_gb": round(torch.cuda.memory_allocated() / 1e9, 2),
               "cuda_peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2)}
        torch.cuda.reset_peak_memory_stats()
        return row

    def emit(row):
        row = {**row, "t": round(time.time() - START, 1)}
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        log.info("ROW %s", json.dumps(row))

    n_heldout, n_wiki = int(kv.pop("heldout", 64)), int(kv.pop("wiki", 32))
    cfg = compose("experiment=heldout_c4", f"data.eval.n_windows={n_heldout}", f"llm.device={device}",
                  "data.calib.n_windows=null", f'data.calib.source.split="{CALIB_SPLIT}"')
    wiki_cfg = compose(f"llm.device={device}", f"data.eval.n_windows={n_wiki}")
    llm_cfg = LLMConfig(name=cfg.llm.name, dtype=cfg.llm.dtype, device=device, seed=cfg.seed)
    tok = load_tokenizer(llm_cfg)
    calib = token_windows(tok, window_spec(cfg.data.calib), "data.calib")
    heldout = token_windows(tok, window_spec(cfg.data.eval), "data.eval")
    wiki = token_windows(tok, window_spec(wiki_cfg.data.eval), "data.eval")
    model, tok = load_llm(llm_cfg, tokenizer=tok)
    view = ModelView(model)
    d = view.dims
    dims = dict(d_model=d.hidden, n_layers=d.n_layers, n_heads=d.n_heads, ffn=d.ffn, feature_layer=0)
    layers = list(range(1, d.n_layers))
    card = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    log.info("calib %s, heldout %s, wiki %s windows; %s; %.0f s", tuple(calib.shape), tuple(heldout.shape),
             tuple(wiki.shape), card, time.time() - START)
    fp = model_fingerprint(model)
    info = {"criterion": "activation", "granularity": "token", "feature_layer": 0}

    def ppl(windows, source):
        lv = Level(0.5, 0.0)
        evaluate_levels(model, windows, source, [lv], first_layer=1, batch_size=8)
        stats = lv.counter.stats(d.n_heads, d.ffn, d.n_kv_heads) if source is not None else {}
        return lv.ppl, stats.get("realized_ffn_sparsity", 0.0)

    dense = {"heldout": ppl(heldout, None)[0]}
    emit({"eval": "heldout_c4_64", "method": "dense", "ppl": dense["heldout"], "card": card, "dtype": str(
        next(model.parameters()).dtype)})
    screened = []
    for name in runs:
        spec = dict(RUNS[name])
        if students_override:
            spec["students"] = students_override.split(",")
        if epochs_override:
            spec["epochs"] = int(epochs_override)
        if seconds_override:
            spec["seconds"] = float(seconds_override)
        left = deadline - (time.time() - START) - 10 * len(spec["students"]) - 40
        if left < 30:
            log.info("run %s skipped: %.0f s left before the deadline", name, left)
            continue
        w = calib if spec["windows"] is None else calib[:spec["windows"]]
        students = students_for(spec["students"], dims, layers)
        fcfg = OnlineFitConfig(epochs=spec["epochs"], max_seconds=min(spec["seconds"], left), seed=cfg.seed,
                               **{k: type(getattr(OnlineFitConfig, k))(v) for k, v in kv.items()})
        t0 = time.time()
        history = fit_online(model, w, students, fcfg, val_windows=heldout[-8:],
                             on_epoch=lambda r, name=name: emit({"run": name, "history": r, **memory()}))
        fit_s = time.time() - t0
        for s in students:
            source = scores_for(s.predictor) if s.kind != "ffn_input" else VerifyScores(0.5, s.predictor)
            p, realized = ppl(heldout, source)
            folder = save / name / s.name
            if s.kind == "ffn_input":
                folder.mkdir(parents=True, exist_ok=True)
                s.predictor.save(folder / "verify_predictor.safetensors", fp)
            else:
                s.predictor.save_pretrained(folder, fp, info, extra={"loss": s.system.fit_cfg.loss, "online": True,
                                                                     "epochs": len(history), "tokens": w.numel()})
            row = {"eval": "heldout_c4_64", "run": name, "student": s.name, "kind": s.kind, "ppl": p,
                   "x_dense": p / dense["heldout"], "realized_ffn_sparsity": realized, "tokens": w.numel(),
                   "epochs": len(history), "fit_seconds": round(fit_s, 1), "student_seconds": round(s.seconds, 1),
                   "val_recall_ffn": history[-1].get(f"{s.name}/val_recall_ffn"),
                   "params": sum(t.numel() for t in s.predictor.parameters()), "path": str(folder), "card": card}
            emit(row)
            screened.append(row)
        del students
        torch.cuda.empty_cache() if device == "cuda" else None
    # the picks (lowest held-out perplexity): the best shared predictor, and the best of all
    picks = []
    shared = [r for r in screened if r["kind"] == "shared"]
    for group in (shared, screened):
        if group:
            best = min(group, key=lambda r: r["ppl"])
            if best not in picks:
                picks.append(best)
    if picks and deadline - (time.time() - START) > 25:
        dense["wiki"] = ppl(wiki, None)[0]
        emit({"eval": "wikitext2_test_32", "method": "dense", "ppl": dense["wiki"], "card": card})
        for r in picks:
            from shadowsparse.system import load_predictor
            from shadowsparse.verify_predictor import FFNInputPredictor
            if r["kind"] == "ffn_input":
                pred = FFNInputPredictor.load(Path(r["path"]) / "verify_predictor.safetensors", model).to(device)
                source = VerifyScores(0.5, pred)
            else:
                source = scores_for(load_predictor(r["path"], model).to(device))
            p, realized = ppl(wiki, source)
            emit({"eval": "wikitext2_test_32", "run": r["run"], "student": r["student"], "kind": r["kind"],
                  "ppl": p, "x_dense": p / dense["wiki"], "realized_ffn_sparsity": realized, "card": card})
    size = lambda r: sum(f.stat().st_size for f in Path(r["path"]).iterdir())  # noqa: E731
    picks = [r for r in picks if size(r) < 30e6]  # what comes back from the GPU: under 64 MB in all
    if picks:
        rel = [str(Path(r["path"]).relative_to(save)) for r in picks]
        subprocess.run(f"tar cf - {' '.join(rel)} | split -b 15m - {out}/picked.tar.part", shell=True, cwd=save,
                       check=True)
    log.info("done in %.0f s", time.time() - START)


if __name__ == "__main__":
    main()
