"""Held-out screening of per-layer neuron selectors on recorded FFN inputs/activations (docs/research.md).

Trains one variant per probe layer on the first N rows of a training recording (research/research_record.py) and
scores it on a held-out recording (other C4 windows):
  mass50      Σ|a| over the predicted top half / Σ|a| over the true top half (per token, averaged)
  vmass50@q   the same for predict-then-verify: the top half by |a| among the predicted top q
  recall@q    fraction of the true top half inside the predicted top q
  cmass50     like vmass50@q but mass measured as |a|·||W_down col|| (output contribution)
usage: python research/research_probe.py NAME key=value ...   (keys: VerifyConfig fields, rows, feature, layers)
"""
import json
import sys
import time

import torch

torch.set_num_threads(1)
from shadowsparse.ffn_io import load_layer  # noqa: E402
from shadowsparse.quant import quantize_rows  # noqa
from shadowsparse.verify import VerifyConfig
from shadowsparse.verify_predictor import FFNInputPredictor, fit_layer, normalized_target  # noqa

TRAIN, HELD = "outputs/research/ffn_train", "outputs/research/ffn_heldout"
COLS = torch.load("outputs/research/down_col_norms.pt")  # {layer: (F,)}


def write_probe(res: dict) -> None:
    """Print one probe's result and append it to outputs/research/probes.jsonl."""
    print(json.dumps(res))
    with open("outputs/research/probes.jsonl", "a") as f:
        f.write(json.dumps(res) + "\n")


def topk_bool(s, k):
    return torch.zeros_like(s, dtype=torch.bool).scatter_(-1, s.topk(k, -1).indices, True)


def scores_mass(pred_scores, a, qs, col):
    F = a.shape[-1]
    k = F // 2
    out = {}
    for name, imp in (("", a.abs()), ("c", a.abs() * col)):
        true = imp.topk(k, -1).values.sum(-1)
        p_top = topk_bool(pred_scores, k)
        if name == "":
            out["mass50"] = float(((imp * p_top).sum(-1) / true).mean())
        for q in qs:
            cand = topk_bool(pred_scores, int(round(q * F)))
            kept = imp.masked_fill(~cand, -1).topk(k, -1).values.clamp(min=0).sum(-1)
            out[f"{name}vmass50@{q}"] = float((kept / true).mean())
            if name == "":
                out[f"recall@{q}"] = float((topk_bool(imp, k) & cand).sum(-1).float().mean() / k)
    return out


def baselines(layers, qs):
    """Static (training-mean |a|) and CATS (|silu(gate)|, needs the gate weights) proposers on the same held-out."""
    gates = torch.load("outputs/research/gate_weights.pt")
    res = {"name": "baselines"}
    for l in layers:
        ah = load_layer(HELD, "a", l).float()
        mean = load_layer(TRAIN, "a", l, slice(0, 16384)).float().abs().mean(0)
        xh = load_layer(HELD, "x", l).float()
        gate = torch.nn.functional.silu(xh @ gates[l].T).abs()
        res[f"L{l}"] = {"static": scores_mass(mean.expand_as(ah), ah, qs, COLS[l]),
                        "gate": scores_mass(gate, ah, qs, COLS[l])}
    write_probe(res)


def qgate(bits_list, group, with_up=False, mode="midrise", layers=(3, 15, 27), qs=(0.5, 0.6, 0.7, 0.8)):
    """Proposer = |silu(Q(W_gate) x)| with a low-bit copy of the gate (a sketch read before the FFN runs);
    with_up: |silu(Q(W_gate) x) * Q(W_up) x|, a low-bit sketch of the activation itself."""
    gates = torch.load("outputs/research/gate_weights.pt")
    ups = torch.load("outputs/research/up_weights.pt") if with_up else None
    for bits in bits_list:
        res = {"name": f"q{'act' if with_up else 'gate'}{bits}b_g{group}_{mode}"}
        for l in layers:
            ah, xh = load_layer(HELD, "a", l).float(), load_layer(HELD, "x", l).float()
            s = torch.nn.functional.silu(xh @ quantize_rows(gates[l], bits, group, mode).T)
            if with_up:
                s = s * (xh @ quantize_rows(ups[l], bits, group, mode).T)
            s = s.abs()
            res[f"L{l}"] = {k: round(v, 4) for k, v in scores_mass(s, ah, list(qs), COLS[l]).items()}
        write_probe(res)


def main():
    name = sys.argv[1]
    if name == "baselines":
        return baselines([3, 15, 27], [0.5, 0.6, 0.7, 0.8])
    if name == "qgate":
        return qgate([int(b) for b in sys.argv[2].split(",")], int(sys.argv[3]), "up" in sys.argv[4:],
                     "symmetric" if "symmetric" in sys.argv[4:] else "midrise")
    kv = dict(a.split("=", 1) for a in sys.argv[2:])
    rows = int(kv.pop("rows", 16384))
    feature = kv.pop("feature", "x")  # x: FFN input; h: decoder-layer input (rms-normed)
    layers = [int(v) for v in kv.pop("layers", "3,15,27").split(",")]
    qs = [float(v) for v in kv.pop("qs", "0.5,0.6,0.7,0.8").split(",")]
    cfg = VerifyConfig(**{k: type(getattr(VerifyConfig, k))(v) for k, v in kv.items()})
    res = {"name": name, "rows": rows, "feature": feature, **{k: v for k, v in cfg.__dict__.items()}}
    t0 = time.time()
    for l in layers:
        def feat(d, r=None):
            x = load_layer(d, feature, l, r).float()
            return torch.nn.functional.rms_norm(x, (x.shape[-1],)) if feature == "h" else x
        x = feat(TRAIN, slice(0, rows))
        a = load_layer(TRAIN, "a", l, slice(0, rows))
        t = normalized_target(a, cfg.eps, COLS[l] if cfg.target == "contribution" else None)
        del a
        pred = FFNInputPredictor(x.shape[-1], t.shape[-1], [l], cfg.rank, cfg.act)
        fit_layer(pred, l, x, t, cfg)
        del x, t
        xh, ah = feat(HELD), load_layer(HELD, "a", l).float()
        with torch.no_grad():
            s = pred.predict_layer(l, xh)
        res[f"L{l}"] = {k: round(v, 4) for k, v in scores_mass(s, ah, qs, COLS[l]).items()}
    res["seconds"] = round(time.time() - t0)
    write_probe(res)


if __name__ == "__main__":
    main()
