"""Issue 18 goal 1 (session 18): does a short self-distillation fine-tune under sparsity move the frontier?

The training-free selectors stop at ~0.34 of the decoder-linear bytes at <= 1.05x dense perplexity on the embedded
SmolLM2 (sketch_teal, FFN 0.5, attention inputs 0.3); FFN 0.6 / 0.7 cost 1.05x / 1.12x on held-out C4. Here the
model itself is fine-tuned to tolerate the sparsity: a student copy runs with the true top-|a| FFN neurons kept
(per token, the fraction 1 - ffn) and the top-|x| attention input channels kept (q/k/v's input and o's input,
1 - attn), and learns to match the frozen dense model's next-token distribution (KL(teacher || student), every
position) on C4 calibration text disjoint from the held-out screen. The loss target is the dense model itself,
not the text: the student cannot gain by adapting to C4's domain, so its perplexity ratio against the original
dense model measures recovered sparsity loss, not domain fit (its own dense perplexity is reported beside).

After the fine-tune the training-free selectors are rebuilt on the student's weights (the sketch's GPTQ copy and
thresholds from the calibration windows, as for any model) and evaluated through load_gated's mask path.

usage (repository root):
    python research/sparse_distill.py OUT [ffn=0.6] [attn=0.3] [steps=200] [batch=8] [seq=256] [lr=5e-5]
        [warmup=10] [train_seconds=S] [device=cpu] [screen=16] [wiki=0] [levels=0.5,0.6,0.7]
        [methods=sketch_teal,sketch_threshold] [save=DIR] [load=DIR] [stacks=SECONDS]
        [through=sketch_teal]

The fine-tune is shadowsparse/distill.py (Lightning; bf16-mixed on CUDA). Rows go to OUT/results.jsonl: the
training summary (held-out KL before and after), then each method x level on held-out C4, then with wiki=N the
WikiText-2 test windows once for each method's pick (its highest FFN level within bar=1.05 x the original dense
perplexity on held-out C4). through=METHOD trains through that selector's own decisions (its hooks, built on the
base model at the training level: the sketch's fixed copy and thresholds, teal's thresholds) instead of the exact
top-|a| / top-|x|. save=DIR writes the student's weights as safetensors (load=DIR evaluates saved
weights, no training).
"""
from __future__ import annotations

import faulthandler
import json
import logging
import sys
import time
from pathlib import Path

import torch

START = time.time()
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from shadowsparse.accounting import weight_bytes_skipped  # noqa: E402
from shadowsparse.arch import ModelView  # noqa: E402
from shadowsparse.config import verify_config, window_spec  # noqa: E402
from shadowsparse.data import token_windows  # noqa: E402
from shadowsparse.distill import DistillConfig, distill, load_distilled, save_distilled  # noqa: E402
from shadowsparse.generation import load_gated  # noqa: E402
from shadowsparse.llm import LLMConfig, load_llm, load_tokenizer, model_fingerprint  # noqa: E402
from shadowsparse.teal import input_bytes_skipped  # noqa: E402
from shadowsparse.verify import sketch_bytes  # noqa: E402
from research.gpu_predictor import compose  # noqa: E402  (train.yaml composed with overrides)

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
log = logging.getLogger("shadowsparse")
TRAIN_SPLIT = "train[:1000]+train[1100:]"  # the C4 sample without the held-out screen's documents (1000-1099)


def bytes_skipped(model, cfg, st: dict, first_layer: int = 1) -> float:
    """The fraction of decoder-linear weight bytes a token skips, as the pipeline's sketch_threshold / sketch_teal
    rows count it: the FFN's kept set (gate/up/down rows), the attention inputs' skipped columns, the sketch's copy
    charged (its bytes at the configured bits and group)."""
    view = ModelView(model)
    n = view.dims.n_layers - first_layer
    ffn = st["realized_ffn_sparsity"]
    ffn_part = weight_bytes_skipped(view, "verify", {"gated_layers": n, "realized_candidate_sparsity": ffn,
                                                "realized_ffn_sparsity": ffn},
                               sketch_bytes(view, n, verify_config(cfg)))
    return ffn_part + input_bytes_skipped(view, st, n)


def evaluate(model, tok, calib, windows, name, methods, levels, attn, emit) -> list[dict]:
    """Each method at each FFN level through load_gated's mask path (the selectors rebuilt on this model's
    weights, calibrated on ``calib``), plus the model's own dense perplexity; the rows made."""
    g = load_gated(model, method="dense", tokenizer=tok, calib=calib, engine="hooks")
    rows = [{"eval": name, "method": "dense", "ppl": g.perplexity(windows)}]
    emit(rows[-1])
    cfg = compose(f"evaluate.teal.sketch_attn={attn}")
    for method, s in ((m, s) for m in methods for s in levels):
        g = load_gated(model, method=method, ffn_sparsity=s, tokenizer=tok, calib=calib, engine="hooks",
                       overrides=[f"evaluate.teal.sketch_attn={attn}"])
        ppl = g.perplexity(windows)
        st = {k: v for k, v in g.stats().items() if k.startswith("realized") and "per_layer" not in k}
        rows.append({"eval": name, "method": method, "ffn": s, "attn": attn if method == "sketch_teal" else 0.0,
                     "ppl": ppl, "bytes_skipped": bytes_skipped(model, cfg, st), **st})
        emit(rows[-1])
    return rows


def picks(rows: list[dict], dense: float, bar: float) -> list[tuple[str, float]]:
    """Per method, the highest FFN level whose held-out perplexity is within ``bar`` x the original dense model's:
    the one setting that goes to the test windows."""
    out = {}
    for r in rows:
        if r["method"] != "dense" and r["ppl"] <= bar * dense and r["ffn"] >= out.get(r["method"], -1.0):
            out[r["method"]] = r["ffn"]
    return sorted(out.items())


def main():
    out = Path(sys.argv[1])
    kv = dict(a.split("=", 1) for a in sys.argv[2:])
    device, ffn, attn = kv.get("device", "cpu"), float(kv.get("ffn", 0.6)), float(kv.get("attn", 0.3))
    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    if "stacks" in kv:  # every N seconds, where every thread is (a slow step found without a profiler)
        faulthandler.dump_traceback_later(int(kv["stacks"]), repeat=True, file=(out / "stacks.txt").open("w"))

    def emit(row):
        row = {**row, "t": round(time.time() - START, 1)}
        with (out / "results.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        log.info("ROW %s", json.dumps(row))

    seq = int(kv.get("seq", 256))
    cfg = compose("experiment=heldout_c4", f"data.eval.n_windows={kv.get('screen', 16)}", f"llm.device={device}")
    train_cfg = compose(f"data.calib.seq_len={seq}", "data.calib.n_windows=" + kv.get("train_windows", "2000"),
                        f'data.calib.source.split="{TRAIN_SPLIT}"')
    llm_cfg = LLMConfig(name=cfg.llm.name, dtype=cfg.llm.dtype, device=device, seed=cfg.seed)
    tok = load_tokenizer(llm_cfg)
    calib = token_windows(tok, window_spec(cfg.data.calib), "data.calib").to(device)  # the selectors' calibration
    heldout = token_windows(tok, window_spec(cfg.data.eval), "data.eval")
    model, tok = load_llm(llm_cfg, tokenizer=tok)
    emit({"config": {**kv, "ffn": ffn, "attn": attn}, "calib": list(calib.shape), "heldout": list(heldout.shape)})
    base = load_gated(model, method="dense", tokenizer=tok, calib=calib, engine="hooks").perplexity(heldout)
    emit({"eval": "heldout_c4", "method": "dense_original", "ppl": base})  # the bar's denominator
    if "load" in kv:
        emit({"loaded": load_distilled(kv["load"], model)["summary"]})
    elif int(kv.get("steps", 200)) > 0:
        train = token_windows(tok, window_spec(train_cfg.data.calib), "data.calib").to(device)
        dcfg = DistillConfig(ffn=ffn, attn=attn, steps=int(kv["steps"]), batch_size=int(kv.get("batch", 8)),
                             lr=float(kv.get("lr", 5e-5)), warmup_steps=int(kv.get("warmup", 10)))
        trainer = {"accelerator": "gpu", "precision": "bf16-mixed"} if device == "cuda" else {}
        if "train_seconds" in kv:  # the device call's time limit: keep what was trained
            trainer["max_time"] = {"seconds": int(kv["train_seconds"])}
        fingerprint = model_fingerprint(model)  # of the base model: a saved student is refused for another
        sparsity = None
        if kv.get("through"):  # train through a selector's own decisions (its hooks, built on the base model)
            handle = load_gated(model, method=kv["through"], ffn_sparsity=ffn, tokenizer=tok, calib=calib,
                                engine="hooks", overrides=[f"evaluate.teal.sketch_attn={attn}"]).decoder.attach
            sparsity = handle  # attach(student) -> a handle that is its own context manager
        model, summary = distill(model, train, dcfg, trainer_cfg=trainer, sparsity=sparsity)
        emit({"phase": "train", "train_windows": list(train.shape), **summary})
        if "save" in kv:
            save_distilled(model, kv["save"], fingerprint, dcfg, summary)
    methods = [m for m in kv.get("methods", "sketch_teal,sketch_threshold").split(",") if m]
    if not methods:  # methods= (empty): train and save only; a later process evaluates with load=DIR
        return
    levels = [float(s) for s in kv.get("levels", "0.5,0.6,0.7").split(",")]
    rows = evaluate(model, tok, calib, heldout, "heldout_c4", methods, levels, attn, emit)
    chosen = picks(rows, base, float(kv.get("bar", 1.05)))
    emit({"picked_on_heldout": chosen})
    if int(kv.get("wiki", 0)) > 0 and chosen:
        wiki_cfg = compose(f"llm.device={device}", f"data.eval.n_windows={kv['wiki']}")
        wiki = token_windows(tok, window_spec(wiki_cfg.data.eval), "data.eval")
        for method, s in chosen:  # each pick once on the test windows
            evaluate(model, tok, calib, wiki, "wikitext2_test", [method], [s], attn, emit)


if __name__ == "__main__":
    main()
