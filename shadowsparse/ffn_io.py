"""Per-layer FFN input/output recordings for training per-layer selectors on many tokens.

One dense pass over calibration windows writes, for each requested layer, two fp16 memmaps on disk (``.npy``):
``x{l}.npy`` (N, d_model) — the FFN input (what gate/up read: the post-attention-norm hidden state) and
``a{l}.npy`` (N, F) — the FFN activation (what the down projection reads). Optionally ``h{l}.npy`` (N, d_model),
the decoder layer's own input (pre-attention), for comparing what a predictor reads. Layers are stored apart so a
trainer loads one layer at a time (RAM stays at one layer's rows), whatever the number of tokens.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .arch import ModelView
from .partial_forward import forward_until


def ffn_input_module(view: ModelView, layer: int):
    """The first FFN input projection (gate, a fused gate_up, or fc1): its input is the FFN input (B, T, d)."""
    return view.module(layer, view.spec.ffn_in[0])


@torch.no_grad()
def record_ffn_io(model, windows: torch.Tensor, layers: list[int], out_dir: str | Path,
                  layer_inputs: tuple[int, ...] = (), desc: str = "record ffn io") -> dict:
    """Dense pass over windows (N, T); writes per-layer memmaps under out_dir and meta.json; returns the meta.
    Reuses a finished recording of the same windows and layers."""
    out = Path(out_dir)
    view = ModelView(model)
    d, F = view.dims.hidden, view.dims.ffn
    n = windows.numel()
    meta = {"n": n, "d": d, "ffn": F, "layers": list(layers), "layer_inputs": list(layer_inputs),
            "windows_sum": int(windows.sum()), "windows_shape": list(windows.shape)}
    if (out / "meta.json").exists() and json.loads((out / "meta.json").read_text()) == meta:
        return meta
    out.mkdir(parents=True, exist_ok=True)
    mm = {}
    for l in layers:
        mm["x", l] = np.lib.format.open_memmap(out / f"x{l}.npy", "w+", np.float16, (n, d))
        mm["a", l] = np.lib.format.open_memmap(out / f"a{l}.npy", "w+", np.float16, (n, F))
    for l in layer_inputs:
        mm["h", l] = np.lib.format.open_memmap(out / f"h{l}.npy", "w+", np.float16, (n, d))
    pos = [0]
    T = windows.shape[1]

    def put(key):
        def hook(module, args, kwargs=None):
            t = args[0] if args else kwargs["hidden_states"]
            mm[key][pos[0]:pos[0] + T] = t.reshape(-1, t.shape[-1]).to(torch.float16).cpu().numpy()
        return hook

    hooks = []
    for l in layers:
        hooks.append(ffn_input_module(view, l).register_forward_pre_hook(put(("x", l))))
        hooks.append(view.ffn_down(l).register_forward_pre_hook(put(("a", l))))
    for l in layer_inputs:
        hooks.append(view.layer(l).register_forward_pre_hook(put(("h", l)), with_kwargs=True))
    last = max([*layers, *layer_inputs])
    body = view.model.base_model  # the decoder without its LM head (model, transformer, gpt_neox, ...)
    try:
        for i in tqdm(range(len(windows)), desc=desc, unit="win"):  # nothing after the last recorded layer is needed
            forward_until(body, windows[i:i + 1].to(next(model.parameters()).device), view.layer(last))
            pos[0] += T
    finally:
        for h in hooks:
            h.remove()
    for m in mm.values():
        m.flush()
    (out / "meta.json").write_text(json.dumps(meta))
    return meta


def load_layer(out_dir: str | Path, kind: str, layer: int, rows: slice | None = None) -> torch.Tensor:
    """One recorded tensor as fp16 torch (copied into RAM): kind 'x' (FFN input), 'a' (activation), 'h' (layer input)."""
    arr = np.load(Path(out_dir) / f"{kind}{layer}.npy", mmap_mode="r", allow_pickle=False)
    return torch.from_numpy(np.array(arr[rows] if rows is not None else arr))  # a writable copy
