"""The real embedded SmolLM2-135M through load_gated on a GPU: WikiText-2 perplexity through the decode engine and
through the mask path (the same selector), and greedy generation speed of both, dense in the same run.

    python benchmarks/generate_embedded.py [--windows 32] [--methods dense:0,teal:0.4] [--out $OUT/generate.json]
    (a CUDA GPU; docs/benchmarks.md)
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import shadowsparse as ss
from shadowsparse.data import TextSource, WindowSpec, token_windows
from shadowsparse.llm import LLMConfig, load_llm

WIKI = TextSource(path="text", data_files="data/wikitext-2-raw/wiki.test.raw", sample_by="document", separator="")
C4 = TextSource(path="json", data_files="data/c4_validation_sample/c4_validation_2k.jsonl", text_field="text",
                separator="\n\n")
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three laws of thermodynamics are"]


def speed(g, new_tokens: int) -> dict:
    g.generate(PROMPTS[:1], max_new_tokens=8)  # warm-up (kernel compilation)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    texts = [g.generate(p, max_new_tokens=new_tokens) for p in PROMPTS]
    torch.cuda.synchronize()
    n = sum(len(g.tok(t)["input_ids"]) for t in texts)
    return {"tokens_per_s": n / (time.perf_counter() - t0), "sample": texts[0][:120]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--decode-windows", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--methods", default="dense:0,sketch:0.5,sketch_threshold:0.3,sketch_threshold:0.5,"
                                         "sketch_threshold:0.7",
                    help="method:sparsity pairs, comma-separated (load_gated's method and ffn_sparsity)")
    ap.add_argument("--out", default="generate.json")
    args = ap.parse_args()
    model, tok = load_llm(LLMConfig(name="embedded:smollm2", device="cuda"))
    windows = token_windows(tok, WindowSpec(seq_len=512, n_windows=args.windows, source=WIKI))
    calib = token_windows(tok, WindowSpec(seq_len=512, n_windows=32, source=C4))
    rows = []
    for method, s in ((m, float(v)) for m, v in (p.split(":") for p in args.methods.split(","))):
        kw = dict(method=method, ffn_sparsity=s, tokenizer=tok, calib=calib)
        fast, ref = ss.load_gated(model, engine="kernels", **kw), ss.load_gated(model, engine="hooks", **kw)
        row = {"method": method, "ffn_sparsity": s, "card": torch.cuda.get_device_name(), "dtype": "float32",
               "windows": f"{args.windows}x512 wikitext-2 test", "ppl_hooks": ref.perplexity(windows),
               "ppl_engine_prefill": fast.perplexity(windows)}
        row["rel_diff_prefill"] = row["ppl_engine_prefill"] / row["ppl_hooks"] - 1
        few = windows[:args.decode_windows]
        row["ppl_hooks_few"] = ref.perplexity(few)
        row["ppl_engine_token_by_token_few"] = fast.perplexity(few, token_by_token=True)
        row["rel_diff_token_by_token"] = row["ppl_engine_token_by_token_few"] / row["ppl_hooks_few"] - 1
        row["engine"] = speed(fast, args.new_tokens)
        row["hooks"] = speed(ref, args.new_tokens)
        row["stats_engine"] = fast.stats()
        print(json.dumps(row), flush=True)
        rows.append(row)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
