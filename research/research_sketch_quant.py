"""Held-out screening of data-aware low-bit sketches of W_gate and W_up (docs/research.md, "Pushing the sketch").

The sketch estimates |silu(gate) * up| from low-bit copies of W_gate and W_up; the pipeline's copy is round-to-nearest
per group (quantize_rows). Here the copy may use calibration inputs x of the same layer (C4 rows of the training
recording, never the held-out ones):
  rtn      quantize_rows as in the pipeline
  awq      AWQ-style: W * diag(s) quantized, s = mean|x_j| ** alpha (alpha searched per matrix on the output error)
  gptq     GPTQ: columns quantized in order, each one's error pushed onto the later columns through H = X^T X
  gptq_act the same in order of decreasing diag(H) (groups formed in that order; a kernel gathers x once)
Scores: mass50 and vmass50@q (research/research_probe.py), plus the relative output error of gate and up on held-out x.
usage: PYTHONPATH=. python research/research_sketch_quant.py METHOD BITS [group=64] [rows=4096] [layers=3,15,27]
       [damp=0.01]
"""
import sys
import time

import torch

torch.set_num_threads(1)
from research.research_probe import COLS, HELD, TRAIN, scores_mass, write_probe  # noqa: E402
from shadowsparse.ffn_io import load_layer  # noqa: E402
from shadowsparse.quant import gptq_act_order, gptq_rows, quantize_rows  # noqa: E402


def awq_rows(w, x, bits, group, alphas=(0.0, 0.25, 0.5, 0.75, 1.0)):
    """Best per-input-channel scaling s = mean|x| ** alpha for the output error on x; returns the dequantized copy."""
    mean = x.abs().mean(0).clamp(min=1e-6)
    best, best_err = None, None
    for alpha in alphas:
        s = mean ** alpha
        s = s / (s.max() * s.min()).sqrt()
        q = quantize_rows(w * s, bits, group) / s
        err = float(((x @ (q - w).T) ** 2).mean())
        if best_err is None or err < best_err:
            best, best_err = q, err
    return best


def main():
    method, bits = sys.argv[1], int(sys.argv[2])
    kv = dict(a.split("=", 1) for a in sys.argv[3:])
    group, rows = int(kv.get("group", 64)), int(kv.get("rows", 4096))
    layers = [int(v) for v in kv.get("layers", "3,15,27").split(",")]
    damp = float(kv.get("damp", 0.01))
    gates = torch.load("outputs/research/gate_weights.pt")
    ups = torch.load("outputs/research/up_weights.pt")
    res = {"name": f"sq_{method}{bits}b_g{group}_r{rows}" + (f"_d{damp}" if method.startswith("gptq") else ""),
           "method": method, "bits": bits, "group": group, "rows": rows}
    t0 = time.time()
    for l in layers:
        x = load_layer(TRAIN, "x", l, slice(0, rows)).float()
        xh, ah = load_layer(HELD, "x", l).float(), load_layer(HELD, "a", l).float()
        qs = []
        for w in (gates[l].float(), ups[l].float()):
            if method == "rtn":
                q = quantize_rows(w, bits, group)
            elif method == "awq":
                q = awq_rows(w, x, bits, group)
            elif method == "gptq":
                q = gptq_rows(w, x.T @ x, bits, group, damp)
            elif method == "gptq_act":  # channels in order of decreasing diag(H), groups formed in that order
                q = gptq_act_order(w, x.T @ x, bits, group, damp)
            else:
                raise SystemExit(f"unknown method {method}")
            qs.append(q)
        g, u = xh @ qs[0].T, xh @ qs[1].T
        s = (torch.nn.functional.silu(g) * u).abs()
        out = scores_mass(s, ah, [0.5, 0.6, 0.7], COLS[l])
        for name, q, w in (("gate", qs[0], gates[l].float()), ("up", qs[1], ups[l].float())):
            out[f"relerr_{name}"] = float((xh @ (q - w).T).norm() / (xh @ w.T).norm())
        res[f"L{l}"] = {k: round(v, 4) for k, v in out.items()}
    res["mass50"] = round(sum(res[f"L{l}"]["mass50"] for l in layers) / len(layers), 4)
    res["vmass50@0.6"] = round(sum(res[f"L{l}"]["vmass50@0.6"] for l in layers) / len(layers), 4)
    res["seconds"] = round(time.time() - t0)
    write_probe(res)


if __name__ == "__main__":
    main()
