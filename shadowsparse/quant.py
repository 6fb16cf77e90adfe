"""Low-bit copies of weight matrices (F, d) for the sketch proposer (shadowsparse.verify, sketch / sketch_verify):
round-to-nearest per group of input channels (quantize_rows) and GPTQ on calibration inputs (gptq_rows,
gptq_act_order), both on midrise levels ±(k + 1/2)·step, one step per (row, group).

Each quantizer returns the dequantized copy the mask path multiplies by; the *_codes variants return what a
packed kernel stores instead (integer codes, per-(row, group) steps and, for act order, the input permutation),
and the dequantized copy is computed from exactly those codes, so the mask path and a kernel share every number.
quantize_x8 / x8_grid round a sketch's input to int8 per group (the dp4a kernel's x, kernels/sketch_x8.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .arch import ModelView
from .errors import ConfigError
from .ffn_io import ffn_input_module
from .partial_forward import forward_until


def quantize_rows(w: torch.Tensor, bits: int, group: int, mode: str = "midrise") -> torch.Tensor:
    """Low-bit copy of w (F, d), each group of ``group`` consecutive input channels with one scale; returned
    dequantized, in w's dtype.

    mode "midrise": 2**bits levels ±(k + 1/2)·Δ (no zero level: every code is used), Δ = clip / 2**(bits-1) with the
    clip chosen per group from a grid of fractions of max|w| to minimise the squared error.
    mode "symmetric": round-to-nearest on 2**bits - 1 levels k·Δ with Δ = max|w| / (2**(bits-1) - 1).
    bits=1 in both modes: sign(w)·mean|w| (the least-squares 1-bit code).
    """
    F, d = w.shape
    if d % group:
        raise ConfigError(f"verify.group={group} must divide the FFN input width {d}")
    g = w.detach().float().reshape(F, d // group, group)
    amax = g.abs().amax(-1, keepdim=True).clamp(min=1e-12)
    if mode == "symmetric":
        if bits == 1:
            q = g.sign() * g.abs().mean(-1, keepdim=True)
        else:
            levels = 2 ** (bits - 1) - 1
            scale = amax / levels
            q = (g / scale).round().clamp(-levels, levels) * scale
        return q.reshape(F, d).to(w.dtype)
    if mode != "midrise":
        raise ConfigError(f"quantizer mode must be midrise or symmetric, got {mode!r}")
    if bits == 1:  # sign · mean|w| is the exact least-squares 1-bit code
        return (g.sign() * g.abs().mean(-1, keepdim=True)).reshape(F, d).to(w.dtype)
    return quantize_rows_codes(w, bits, group).dequantize(w.dtype)


X8_MAX = 127  # int8 activations of the sketch (quantize_x8): symmetric, no -128


@dataclass
class MidriseCodes:
    """A midrise low-bit copy of a weight (F, d) as a kernel stores it: the copy is
    ``(codes - 2**(bits-1) + 1/2) * step`` of the code's (row, group), column j of codes being input channel
    ``perm[j]`` (the groups are consecutive columns in that order; perm None: the identity).

    codes: (F, d) uint8 in [0, 2**bits); steps: (F, d // group) fp32; perm: (d,) int64 or None.
    """
    codes: torch.Tensor
    steps: torch.Tensor
    bits: int
    group: int
    perm: torch.Tensor | None = None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The copy (F, d) in dtype, columns back in the weight's own order: the exact numbers quantize_rows,
        gptq_rows and gptq_act_order return (they are computed by this method)."""
        F, d = self.codes.shape
        g = self.codes.reshape(F, d // self.group, self.group)
        q = midrise_values(g, self.steps[..., None], self.bits).reshape(F, d).to(dtype)
        if self.perm is None:
            return q
        out = torch.empty_like(q)
        out[:, self.perm] = q
        return out


def quantize_rows_codes(w: torch.Tensor, bits: int, group: int) -> MidriseCodes:
    """quantize_rows(w, bits, group, "midrise") as codes and steps (bits >= 2: the 1-bit code has no midrise
    levels)."""
    F, d = w.shape
    if d % group:
        raise ConfigError(f"verify.group={group} must divide the FFN input width {d}")
    if bits < 2:
        raise ConfigError(f"midrise codes need bits >= 2, got {bits}")
    g = w.detach().float().reshape(F, d // group, group)
    step = midrise_step(g, bits)  # (F, G, 1)
    return MidriseCodes(midrise_codes(g, step, bits).reshape(F, d), step[..., 0], bits, group)


def midrise_codes(g: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """The code in [0, 2**bits) (uint8) of the midrise level ±(k + 1/2)·step nearest to each entry of g (step
    broadcasts over g's last axis): level index floor(g / step) clamped to [-2**(bits-1), 2**(bits-1) - 1], plus
    2**(bits-1)."""
    half = 2 ** (bits - 1)
    return ((g / step).floor().clamp(-half, half - 1) + half).to(torch.uint8)


def midrise_values(codes: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """The level of each code: (code - 2**(bits-1) + 1/2)·step, in step's dtype. Integer arithmetic up to the
    + 1/2, so a code's value is bit-identical to rounding the weight straight onto the level."""
    half = 2 ** (bits - 1)
    return (codes.to(step.dtype) - half + 0.5) * step


def _midrise(g: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """Values on the 2**bits midrise levels ±(k + 1/2)·step nearest to g (step broadcasts over g's last axis)."""
    return midrise_values(midrise_codes(g, step, bits), step, bits)


def midrise_step(g: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., group) -> (..., 1): the midrise step of each group, clip = a fraction of max|w| from a grid of 17,
    the one with the least squared error, rounded to fp16."""
    amax = g.abs().amax(-1, keepdim=True).clamp(min=1e-12)
    best_step, best_err = None, None
    for frac in torch.linspace(0.2, 1.0, 17).tolist():
        step = amax * frac / 2 ** (bits - 1)
        err = (_midrise(g, step, bits) - g).pow(2).sum(-1, keepdim=True)
        if best_step is None:
            best_step, best_err = step, err
        else:
            better = err < best_err
            best_step, best_err = torch.where(better, step, best_step), torch.where(better, err, best_err)
    # the step a kernel stores: fp16 (kernels/sketch.py), so the mask path's copy and the engine's are the same
    # numbers and both paths keep the same neurons (at least the smallest fp16 subnormal: never a zero step)
    return best_step.to(torch.float16).float().clamp(min=2.0 ** -24)


def gptq_act_order(w: torch.Tensor, hessian: torch.Tensor, bits: int, group: int, damp: float = 0.01) -> torch.Tensor:
    """gptq_rows with the input channels taken in order of decreasing diag(H) (the most active first; groups are
    formed in that order, so a kernel gathers x by one fixed permutation); the copy is returned in w's own order."""
    if bits >= 2:
        return gptq_act_order_codes(w, hessian, bits, group, damp).dequantize(w.dtype)
    perm = torch.argsort(torch.diag(hessian), descending=True)
    q = torch.empty_like(w)
    q[:, perm] = gptq_rows(w[:, perm], hessian[perm][:, perm], bits, group, damp)
    return q


def gptq_act_order_codes(w: torch.Tensor, hessian: torch.Tensor, bits: int, group: int,
                         damp: float = 0.01) -> MidriseCodes:
    """gptq_act_order as codes, steps and the permutation (columns of codes in act order: x[:, perm] is the
    input a kernel multiplies by them). bits >= 2."""
    perm = torch.argsort(torch.diag(hessian), descending=True)
    codes = gptq_rows_codes(w[:, perm], hessian[perm][:, perm], bits, group, damp)
    codes.perm = perm.to(w.device)
    return codes


def quantize_x8(x: torch.Tensor, perm: torch.Tensor | None, group: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, d) -> (q (B, G, group) fp32 integer values in [-127, 127], scale (B, G) fp32): x_p ≈ q·scale per
    group, x_p = x[:, perm]: symmetric, scale = max|x_p[group]| / 127 (0 for an all-zero group). The rounding the
    dp4a kernel reproduces (kernels/sketch_x8.py): q = floor(x_p·(127/max) + 1/2)."""
    xp = x.float() if perm is None else x.float()[:, perm.long()]
    B, d = xp.shape
    xg = xp.reshape(B, d // group, group)
    amax = xg.abs().amax(-1)  # (B, G)
    inv = torch.where(amax > 0, X8_MAX / amax, torch.zeros_like(amax))
    q = torch.floor(xg * inv[..., None] + 0.5).clamp_(-X8_MAX, X8_MAX)
    return q, amax / X8_MAX


def x8_grid(x: torch.Tensor, perm: torch.Tensor | None, group: int) -> torch.Tensor:
    """x (..., d) rounded to the int8 grid of quantize_x8 (groups of ``group`` channels in the order perm), returned
    in x's own channel order and dtype: what a sketch with x_bits=8 multiplies by its copy (verify.VerifyConfig)."""
    shape, d = x.shape, x.shape[-1]
    perm = None if perm is None else perm.to(x.device)
    q, scale = quantize_x8(x.reshape(-1, d), perm, group)
    xp = (q * scale[..., None]).reshape(-1, d)
    out = xp if perm is None else torch.empty_like(xp).index_copy_(1, perm.long(), xp)
    return out.reshape(shape).to(x.dtype)


@torch.no_grad()
def ffn_input_hessians(model, windows: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
    """X^T X (d, d) of each layer's FFN input over the tokens of windows (N, T), one dense pass (float64 sums)."""
    view = ModelView(model)
    out = {l: torch.zeros(view.dims.hidden, view.dims.hidden, dtype=torch.float64) for l in layers}

    def add(module, args, l):
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        out[l] += (x.T @ x).double().cpu()  # one window's sum in fp32, the running sum in fp64
    hooks = [ffn_input_module(view, l).register_forward_pre_hook(lambda m, a, l=l: add(m, a, l)) for l in layers]
    device = next(model.parameters()).device
    try:
        for ids in windows.split(1):  # the layers after the last one read, the final norm and LM head: not run
            forward_until(model, ids.to(device), view.layer(max(layers)))
    finally:
        for h in hooks:
            h.remove()
    return out


def gptq_rows(w: torch.Tensor, hessian: torch.Tensor, bits: int, group: int, damp: float = 0.01) -> torch.Tensor:
    """GPTQ (arXiv 2210.17323) with the midrise groups of quantize_rows: input channels are quantized in order and
    each one's rounding error, weighted by the inverse of H = X^T X (calibration inputs x, (d, d)), is moved onto the
    channels not yet quantized, so the copy's *outputs* on inputs like x stay close (||(Q - W) x||), not its weights.
    A group's step is chosen when the group is reached, from the error-updated weights. Returns the dequantized
    copy (F, d) in w's dtype."""
    if bits >= 2:
        return gptq_rows_codes(w, hessian, bits, group, damp).dequantize(w.dtype)
    return _gptq(w, hessian, bits, group, damp)[0].to(w.dtype)


def gptq_rows_codes(w: torch.Tensor, hessian: torch.Tensor, bits: int, group: int,
                    damp: float = 0.01) -> MidriseCodes:
    """gptq_rows as codes and steps (bits >= 2)."""
    if bits < 2:
        raise ConfigError(f"midrise codes need bits >= 2, got {bits}")
    _, codes, steps = _gptq(w, hessian, bits, group, damp)
    return MidriseCodes(codes, steps, bits, group)


def _gptq(w: torch.Tensor, hessian: torch.Tensor, bits: int, group: int, damp: float):
    """gptq_rows' loop -> (the copy (F, d) fp32, codes (F, d) uint8, steps (F, d // group) fp32); codes and steps
    are None for bits = 1 (sign · mean|w| per group)."""
    F, d = w.shape
    if d % group:
        raise ConfigError(f"verify.group={group} must divide the FFN input width {d}")
    W = w.detach().float().clone()
    H = hessian.to(W.device, torch.float64).clone()
    dead = torch.diag(H) == 0  # channels never active in the calibration: nothing to preserve there
    H[dead, dead] = 1.0
    H += damp * torch.diag(H).mean() * torch.eye(d, dtype=H.dtype, device=H.device)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()  # H^-1 = U^T U
    Q = torch.zeros_like(W)
    codes = torch.zeros(F, d, dtype=torch.uint8, device=W.device) if bits > 1 else None
    steps = W.new_zeros(F, d // group) if bits > 1 else None
    for j0 in range(0, d, group):  # one group at a time; its errors reach the later groups in one product
        j1 = j0 + group
        blk, err = W[:, j0:j1].clone(), W.new_zeros(F, group)
        step = midrise_step(blk, bits) if bits > 1 else None  # (F, 1), from the error-updated weights
        scale = blk.abs().mean(-1, keepdim=True)
        if bits > 1:
            steps[:, j0 // group] = step[:, 0]
        for i in range(group):
            col = blk[:, i:i + 1]
            if bits == 1:
                q = col.sign() * scale
            else:  # the value from its code: MidriseCodes.dequantize gives the same number
                c = midrise_codes(col, step, bits)
                codes[:, j0 + i:j0 + i + 1] = c
                q = midrise_values(c, step, bits)
            Q[:, j0 + i:j0 + i + 1] = q
            err[:, i:i + 1] = (col - q) / U[j0 + i, j0 + i]
            blk[:, i + 1:] -= err[:, i:i + 1] @ U[j0 + i:j0 + i + 1, j0 + i + 1:j1]
        W[:, j1:] -= err @ U[j0:j1, j1:]
    return Q, codes, steps
