"""Train the predict-then-verify predictor for layers 1..29 from the research recording (first ROWS tokens).
usage: python research/research_fit_verify.py ROWS OUT.safetensors [key=value ...]   (VerifyConfig fields)"""
import logging
import sys
import time

import torch

torch.set_num_threads(1)
from shadowsparse.verify import VerifyConfig
from shadowsparse.verify_predictor import fit_from_recording  # noqa: E402

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
rows, out = int(sys.argv[1]), sys.argv[2]
kv = dict(a.split("=", 1) for a in sys.argv[3:])
cfg = VerifyConfig(**{k: type(getattr(VerifyConfig, k))(v) for k, v in kv.items()})
t = time.time()
pred = fit_from_recording("outputs/research/ffn_train", list(range(1, 30)), cfg, rows=slice(0, rows))
pred.save(out)
print(f"saved {out}: {pred.n_params():,} params, {pred.train_tokens} tokens, {time.time() - t:.0f} s")
