"""Where does online_fit's CUDA memory go? (issue 18: device memory grew by about one chunk's rows per chunk.)

Runs fit_online's per-chunk work by hand on a random model in SmolLM2-135M's shapes: A) score chunks only, B) score
and train, C) score and train without autocast; after each chunk, torch.cuda.memory_allocated and every live CUDA
tensor over 20 MB that gc can see, with the types that refer to it.

    python research/online_fit_memory.py [--chunks 4]      (a CUDA device; prints one line per chunk)
"""
import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from shadowsparse.arch import ModelView  # noqa: E402
from shadowsparse.llm import LLMConfig, load_llm  # noqa: E402
from shadowsparse.online_fit import (OnlineFitConfig, _train_chunk, ffn_input_student, score_chunk,  # noqa: E402
                                     shared_student)


def live_cuda(min_bytes: float = 20e6) -> list[str]:
    out = []
    for o in gc.get_objects():
        try:
            if torch.is_tensor(o) and not isinstance(o, torch.nn.Parameter) and o.is_cuda and \
                    o.numel() * o.element_size() > min_bytes:
                refs = sorted({type(r).__name__ for r in gc.get_referrers(o)})
                out.append(f"{tuple(o.shape)} {o.dtype} {o.numel() * o.element_size() / 1e9:.2f} GB <- {refs}")
        except Exception:  # noqa: BLE001 (objects that fail on inspection)
            pass
    return out


def top_allocations(snapshot: dict, n: int = 8) -> list[str]:
    """The live blocks of a torch.cuda.memory._snapshot() grouped by where they were allocated (the innermost
    Python frames of shadowsparse or torch): the n largest groups."""
    groups: dict[str, list[int]] = {}
    for seg in snapshot["segments"]:
        for block in seg["blocks"]:
            if block["state"] != "active_allocated":
                continue
            frames = [f"{Path(f['filename']).name}:{f['line']}:{f['name']}" for f in block.get("frames", [])
                      if "shadowsparse" in f["filename"] or "/torch/" in f["filename"]][:6]
            key = " <- ".join(frames) or "(no Python frame)"
            groups.setdefault(key, [0, 0])
            groups[key][0] += block["size"]
            groups[key][1] += 1
    top = sorted(groups.items(), key=lambda kv: -kv[1][0])[:n]
    return [f"{size / 1e9:.2f} GB in {count} blocks: {key}" for key, (size, count) in top]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--snapshot", action="store_true", help="score+train only, then where the live memory was "
                    "allocated (torch.cuda.memory._record_memory_history)")
    args = ap.parse_args()
    model, _ = load_llm(LLMConfig(name="random-shape:smollm2-135m", device="cuda"))
    d = ModelView(model).dims
    dims = dict(d_model=d.hidden, n_layers=d.n_layers, n_heads=d.n_heads, ffn=d.ffn, feature_layer=0)
    ids = torch.randint(0, 256, (args.windows * args.chunks, 512), generator=torch.Generator().manual_seed(0))
    base = torch.cuda.memory_allocated()
    print(f"model on the card: {base / 1e9:.2f} GB", flush=True)
    variants = (("A score only", False, False), ("B score+train", True, True),
                ("C score+train, no autocast", True, False))
    if args.snapshot:
        variants = variants[1:2]
        torch.cuda.memory._record_memory_history(max_entries=200000)
    for variant, train, autocast in variants:
        cfg = OnlineFitConfig(epochs=1, chunk_windows=args.windows)
        students = [shared_student("shared", dims), ffn_input_student("ffn_r64", dims, range(1, d.n_layers))]
        needs = {s.needs for s in students}
        for s in students:
            s.predictor.to("cuda").train()
            s.opt = torch.optim.AdamW(s.predictor.parameters(), lr=1e-3)
            s.sched = torch.optim.lr_scheduler.LambdaLR(s.opt, lambda step: 1.0)
        start = torch.cuda.memory_allocated()
        for c in range(args.chunks):
            rows = score_chunk(model, ids[c * args.windows:(c + 1) * args.windows].cuda(), cfg, needs)
            size = sum(v.numel() * v.element_size() for v in rows.values())
            if train:
                perm = torch.randperm(rows["neurons"].shape[0], device="cuda")
                _train_chunk(students, rows, perm, cfg, autocast)
                del perm
            del rows
            gc.collect()
            torch.cuda.synchronize()
            grown = (torch.cuda.memory_allocated() - start) / 1e9
            print(f"{variant}: chunk {c}: rows {size / 1e9:.2f} GB; allocated above the start {grown:.2f} GB",
                  flush=True)
        for line in live_cuda():
            print(f"{variant}:   live {line}", flush=True)
        if args.snapshot:
            for line in top_allocations(torch.cuda.memory._snapshot()):
                print(f"{variant}:   allocated at {line}", flush=True)
        del students
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
