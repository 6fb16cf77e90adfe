"""The sketch selector at decode: a packed 2- or 3-bit copy of an FFN's W_gate and W_up scores every neuron before
the FFN runs (shadowsparse.verify, proposer "sketch"), reading (bits + 1/4)/16 of each fp16 matrix.

    pack_sketch(gate, up)        two MidriseCodes (shadowsparse.quant) of W_gate, W_up (F, d) -> PackedSketch
    sketch_from_weights(wg, wu, bits, group, hessian)    quantize (GPTQ in act order given a hessian) and pack
    sketch_scores(x, packed)     x (B, d) -> (B, F) fp32 |act(x_p·Qgᵀ) * (x_p·Quᵀ)|, x_p = x[:, perm] (act: the
                                 FFN's, silu by default; gelu_tanh for Gemma's GeGLU: kernels/ffn.ACTIVATIONS)
    topk_indices(scores, k)      (B, F) -> (B, k) int32, each row's k largest, ascending (selected on device)
    sketch_topk(x, packed, k)    both: the neurons to keep, decided before the FFN runs

FORMAT (PackedSketch). The codes of a (row, group of 64 input channels in act order) are packed whole into NW =
bits·64/32 int32 words (4 at 2 bits, 6 at 3; no code crosses a (row, group) boundary), stored words (F, 2, NW, G)
(matrix 0 = gate, 1 = up; G = d / 64) next to steps (F, 2, G) fp16: bits + 1/4 bits per weight. A code sits in
its word at a fixed bit offset, chosen so that the kernel extracts it with the fewest instructions:
  3 bits: word k holds slots 10k .. 10k+9 at bits 3i .. 3i+2 (i = 0..9); the top two bits of words 3t, 3t+1, 3t+2
          hold, concatenated (2 bits each, low first), the 6 bits of slots 60 + 2t and 61 + 2t (3 each).
  2 bits: word k holds slots 16k .. 16k+15 at bits 2i .. 2i+1.
Slot c of group g is x_p column 64g + c (input channel perm[64g + c]), so the words hold MidriseCodes' columns in
order. Bit planes (one word per bit per 32 inputs) would cost 2·bits integer operations per weight to reassemble a
code; whole codes cost about one (below), and at decode the ALU, not the bytes, is what such a GEMV runs out of.

KERNEL (_sketch_kernel). A code whose bits lie in the low 23 of a word becomes an fp32 number in ONE instruction:
w & mask, read as fp32, is the subnormal code·2**(off - 149) exactly (fp32 FFMA takes subnormals at full rate;
Triton emits fma.rn.f32 without .ftz). So 7 of a word's 10 3-bit codes (11 of 16 2-bit ones) cost one LOP3, the
other 3 (5) share one shift of the word first, and the spare slots one shift-and-mask per word. The scale is put
into x once per call instead (_prep_kernel: x_s[b, c, g] = x_p[b, 64g + c]·2**(X_EXP - off(c)), exact, and the
group sums Σx), so a code times x_s is code·x·2**(X_EXP - 149), a normal number, with one FFMA per weight and row of
x; per group the kernel adds step·(Σ_c code_c·x_c - (2**(bits-1) - 1/2)·Σ_c x_c) to the row, which is the level
(code - 2**(bits-1) + 1/2)·step of quant.midrise_values. Each thread holds whole (row, group) words, so a group
needs no exchange between threads; gate and up share each x_s load; silu(g)·u and |.| come before the only store.
Rows of x go two per program (grid: pairs x neuron blocks, pairs fastest): the pairs of a neuron block run side by
side and read its words from DRAM once, from L2 after.

The torch fallback (CPU, backend="torch") unpacks the words into the dequantized copy (cached on the PackedSketch)
and multiplies: the same numbers the kernel uses, in another summation order. The steps are stored in fp16; where
the quantizer's steps are fp16 numbers already (quant.midrise_step rounds them), the packed copy is the mask path's
copy (VerifyScores) exactly, else it differs by that rounding, at most 2**-11 relative per weight.
"""
from __future__ import annotations

import os

from dataclasses import dataclass, field, fields, replace

import torch

from ..quant import MidriseCodes, gptq_act_order_codes, quantize_rows_codes
from .common import tl, triton, use_triton
from .ffn import ACTIVATIONS, apply_act
from .pdl import pdl_kwargs, pdl_launch_next, pdl_wait

BITS = (2, 3)
GROUP = 64  # input channels per step: 4 words of 2-bit codes or 6 of 3-bit ones per (row, group)
# (block_f, block_g, warps, stages) of _sketch_kernel per bits: the best of benchmarks/sketch_kernel.py's sweep on an
# H200 (Llama-2-7B, one row of x: 15.8 us at 2 bits, 18.0 at 3, against 25.6 for cuBLAS's fp16 GEMV of W_gate alone);
# block_g is capped at G's power of two
DEFAULTS = {2: (8, 32, 4, 1), 3: (16, 32, 4, 1)}
# x_s = x_p · 2**(X_EXP - off): a code read as a subnormal, code·2**(off - 149), times x_s is
# code·x·2**(X_EXP - 149), a normal fp32 number for |code·x| > 2**-66; x_s overflows only for |x| > 2**38
X_EXP = 89
TOPK_METHODS = ("bisect", "radix")
# the top-k kernel of the engine's sketch. bisect is the default: on an H200 the radix select (tl.histogram per
# 8-bit digit) took 51-133 us for one Llama-2-7B row against 19.7 for bisect (docs/research.md, session 9);
# SHADOWSPARSE_TOPK=radix keeps it selectable for the benchmark's A/B
TOPK_METHOD = os.environ.get("SHADOWSPARSE_TOPK", "bisect")
TOPK_WARPS = 8  # warps of the one program per row that selects the top k: 20.6 us for k = F/2 of Llama-2-7B's 11008
# on an H200 (4: 33, 16: 24, 32: 31; torch.topk on the same row: about 50)


def _low_codes(bits: int) -> int:
    """How many codes of a word lie wholly in its low 23 bits (extracted without a shift): 7 at 3 bits, 11 at 2."""
    return 23 // bits


def _codes_per_word(bits: int) -> int:
    return 32 // bits


def slot_offsets(bits: int, group: int) -> list[int]:
    """off(c) for each slot c of a group: the code of slot c is extracted as code·2**off(c) (module docstring)."""
    low, cpw, nw = _low_codes(bits), _codes_per_word(bits), bits * group // 32
    offs = []
    for k in range(nw):
        offs += [bits * i for i in range(low)] + [bits * i for i in range(cpw - low)]
    if bits == 3:  # two spare slots per triplet of words, at bits 0..2 and 3..5 of their 6 concatenated bits
        offs += [0, 3] * (nw // 3)
    assert len(offs) == group
    return offs


@dataclass
class SketchWords:
    """What every packed sketch layout shares (this module's FORMAT, kernels/sketch_x8.py's): words (F, 2, NW, G)
    int32 (matrix 0 = gate, 1 = up), steps (F, 2, G) fp16, perm (d,) int32 or None (x_p = x[:, perm]), bits, group.
    Fields whose names start with "_" are host-side caches, rebuilt after ``to``."""
    words: torch.Tensor
    steps: torch.Tensor
    perm: torch.Tensor | None
    bits: int
    group: int

    @property
    def shape(self) -> tuple[int, int]:
        """(F, d) of each sketched matrix."""
        return self.words.shape[0], self.words.shape[3] * self.group

    @property
    def nbytes(self) -> int:
        """Bytes a scoring pass reads: the words and the steps (x and the permutation are negligible)."""
        return self.words.numel() * 4 + self.steps.numel() * 2

    def to(self, device):
        """The same sketch with its tensors on ``device`` (caches dropped)."""
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                 if f.init and isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **moved)


@dataclass
class PackedSketch(SketchWords):
    """A layer's packed sketch for the fp32 kernel (module docstring, FORMAT); scales (group,) fp32: 2**(X_EXP -
    off) of each slot."""
    scales: torch.Tensor
    _dense: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def dequantized(self) -> torch.Tensor:
        """(2, F, d) fp32: the copies of gate and up in x_p's column order, unpacked from the words (the torch
        fallback's weights; cached)."""
        if self._dense is None:
            codes = unpack_codes(self)  # (2, F, d)
            half = 2 ** (self.bits - 1)
            steps = self.steps.float().permute(1, 0, 2).repeat_interleave(self.group, dim=2)  # (2, F, d)
            self._dense = (codes.float() - half + 0.5) * steps
        return self._dense


def check_format(bits: int, group: int, d: int) -> None:
    if bits not in BITS:
        raise ValueError(f"the sketch kernels take 2 or 3 bits per weight, got bits={bits}")
    if group != GROUP:
        raise ValueError(f"the packed sketch takes groups of {GROUP} input channels (the kernel unrolls a group's "
                         f"4 or 6 words), got group={group}")
    if d % group:
        raise ValueError(f"group={group} must divide the input width d={d}")


def paired_steps(gate: MidriseCodes, up: MidriseCodes) -> torch.Tensor:
    """The checks every packed layout makes on the codes of W_gate and W_up (same shape, bits, group and input
    permutation; fp16-representable steps): their steps stacked, (F, 2, G) fp16."""
    check_format(gate.bits, gate.group, gate.codes.shape[1])
    if (up.codes.shape, up.bits, up.group) != (gate.codes.shape, gate.bits, gate.group):
        raise ValueError(f"gate and up must share shape, bits and group, got {tuple(gate.codes.shape)}/{gate.bits}/"
                         f"{gate.group} and {tuple(up.codes.shape)}/{up.bits}/{up.group}")
    if (gate.perm is None) != (up.perm is None) or (gate.perm is not None and not torch.equal(gate.perm, up.perm)):
        raise ValueError("gate and up must share one input permutation (x is permuted once for both)")
    steps = torch.stack([gate.steps, up.steps], dim=1)  # (F, 2, G) fp32
    if not torch.isfinite(steps).all() or steps.abs().max() > torch.finfo(torch.float16).max:
        raise ValueError("a step is not finite or beyond fp16's range: the sketch stores steps in fp16")
    return steps.half().contiguous()


def pack_sketch(gate: MidriseCodes, up: MidriseCodes) -> PackedSketch:
    """The packed sketch of a SwiGLU layer from the codes of W_gate and W_up (quant.*_codes; same bits, group and
    input permutation: act order from one hessian gives one permutation)."""
    steps = paired_steps(gate, up)
    bits, group = gate.bits, gate.group
    words = torch.stack([_pack_words(gate.codes, bits, group), _pack_words(up.codes, bits, group)], dim=1)
    scales = torch.tensor([2.0 ** (X_EXP - o) for o in slot_offsets(bits, group)], dtype=torch.float32)
    perm = None if gate.perm is None else gate.perm.to(torch.int32)
    return PackedSketch(words.contiguous(), steps, perm, bits, group, scales=scales.to(words.device))


def _pack_words(codes: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """codes (F, d) uint8 -> words (F, NW, G) int32 (FORMAT)."""
    F_, d = codes.shape
    G, nw, cpw = d // group, bits * group // 32, _codes_per_word(bits)
    c = codes.to(torch.int64).reshape(F_, G, group)
    direct = c[:, :, :nw * cpw].reshape(F_, G, nw, cpw)  # (F, G, NW, codes per word)
    words = (direct << (bits * torch.arange(cpw, device=codes.device))).sum(-1)  # (F, G, NW)
    if bits == 3:  # slots 10·NW + 2t, + 1: 6 bits, 2 in the top of each word of triplet t
        spare = c[:, :, nw * cpw:].reshape(F_, G, nw // 3, 2)
        six = spare[..., 0] | (spare[..., 1] << 3)  # (F, G, NW/3)
        tops = torch.stack([six & 3, (six >> 2) & 3, (six >> 4) & 3], dim=-1).reshape(F_, G, nw)
        words = words | (tops << 30)
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words)  # as signed int32 bit patterns
    return words.to(torch.int32).permute(0, 2, 1)


def unpack_codes(packed: PackedSketch) -> torch.Tensor:
    """The codes (2, F, d) uint8 of gate and up in x_p's column order, read back from the words."""
    bits, group = packed.bits, packed.group
    w = packed.words.to(torch.int64) & 0xFFFFFFFF  # (F, 2, NW, G)
    F_, _, nw, G = w.shape
    cpw = _codes_per_word(bits)
    direct = (w[..., None] >> (bits * torch.arange(cpw, device=w.device))) & (2 ** bits - 1)  # (F, 2, NW, G, cpw)
    slots = [direct.permute(0, 1, 3, 2, 4).reshape(F_, 2, G, nw * cpw)]
    if bits == 3:
        tops = (w >> 30).permute(0, 1, 3, 2).reshape(F_, 2, G, nw // 3, 3)  # (F, 2, G, NW/3, 3)
        six = tops[..., 0] | (tops[..., 1] << 2) | (tops[..., 2] << 4)
        slots.append(torch.stack([six & 7, six >> 3], dim=-1).reshape(F_, 2, G, 2 * (nw // 3)))
    return torch.cat(slots, -1).reshape(F_, 2, G * group).permute(1, 0, 2).to(torch.uint8)


def sketch_from_weights(w_gate: torch.Tensor, w_up: torch.Tensor, bits: int = 3, group: int = 64,
                        hessian: torch.Tensor | None = None, damp: float = 0.01) -> PackedSketch:
    """Quantize W_gate and W_up (F, d) as the sketch proposer does (GPTQ in act order on ``hessian`` = X^T X of
    the FFN input, else round-to-nearest midrise) and pack them."""
    check_format(bits, group, w_gate.shape[1])
    if hessian is None:
        return pack_sketch(quantize_rows_codes(w_gate, bits, group), quantize_rows_codes(w_up, bits, group))
    return pack_sketch(gptq_act_order_codes(w_gate, hessian, bits, group, damp),
                       gptq_act_order_codes(w_up, hessian, bits, group, damp))


def _check_x(x: torch.Tensor, packed: PackedSketch) -> None:
    if x.dim() != 2 or x.shape[1] != packed.shape[1]:
        raise ValueError(f"x must be (B, d) with d={packed.shape[1]}, got {tuple(x.shape)}")


def sketch_preacts_torch(x: torch.Tensor, packed: PackedSketch) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_p·Qgᵀ, x_p·Quᵀ), each (B, F) fp32, from the unpacked copy."""
    _check_x(x, packed)
    xp = x.float() if packed.perm is None else x.float()[:, packed.perm.long()]
    w = packed.dequantized()
    return xp @ w[0].T, xp @ w[1].T


def sketch_scores_torch(x: torch.Tensor, packed: PackedSketch, act: str = "silu") -> torch.Tensor:
    g, u = sketch_preacts_torch(x, packed)
    return (apply_act(g, act) * u).abs()


def check_act(act: str) -> None:
    if act not in ACTIVATIONS or act == "relu":  # relu: no gated FFN uses it, and fc1-only FFNs have no up
        raise ValueError(f"act must be the gated FFN's activation, one of {[a for a in ACTIVATIONS if a != 'relu']}, "
                         f"got {act!r}")


if triton is not None:
    from .ffn import apply_act_tl  # the FFN activations inside a kernel, as gated_ffn's

    @triton.jit
    def load_x_groups(x_ptr, perm_ptr, t, D, G, HAS_PERM: tl.constexpr, GROUP: tl.constexpr,
                      BLOCK_G: tl.constexpr):
        """Row t of x in act order, the program's BLOCK_G groups (program_id 1): xv (BLOCK_G, GROUP) fp32 =
        x[t, perm[g·GROUP + c]], with offs_g (BLOCK_G,), offs_c (GROUP,) and the (BLOCK_G, 1) mask of real groups.
        Every prep kernel of the sketch layouts starts with it."""
        offs_g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
        offs_c = tl.arange(0, GROUP)
        mask = (offs_g < G)[:, None]
        j = offs_g[:, None] * GROUP + offs_c[None, :]  # (BLOCK_G, GROUP) columns of x_p
        if HAS_PERM:
            j = tl.load(perm_ptr + j, mask=mask, other=0)
        xv = tl.load(x_ptr + t * D + j, mask=mask, other=0.0).to(tl.float32)
        return xv, offs_g, offs_c, mask

    @triton.jit
    def _prep_kernel(x_ptr, perm_ptr, scale_ptr, xs_ptr, xsum_ptr, D, G, HAS_PERM: tl.constexpr,
                     GROUP: tl.constexpr, BLOCK_G: tl.constexpr, USE_PDL: tl.constexpr):
        """One row of x: xs[t, c, g] = x[t, perm[g·GROUP + c]] · scale[c] (B, GROUP, G), xsum[t, g] = the group's
        sum of x_p (B, G)."""
        pdl_wait(USE_PDL)
        t = tl.program_id(0)
        xv, offs_g, offs_c, mask = load_x_groups(x_ptr, perm_ptr, t, D, G, HAS_PERM, GROUP, BLOCK_G)
        pdl_launch_next(USE_PDL)
        scale = tl.load(scale_ptr + offs_c)
        tl.store(xs_ptr + t * GROUP * G + offs_c[None, :] * G + offs_g[:, None], xv * scale[None, :], mask=mask)
        tl.store(xsum_ptr + t * G + offs_g, tl.sum(xv, axis=1), mask=offs_g < G)

    @triton.jit
    def shr(w, N: tl.constexpr):
        """Logical right shift of int32 words (one SHF; an arithmetic one costs a sign extension more)."""
        return (w.to(tl.uint32, bitcast=True) >> N).to(tl.int32, bitcast=True)

    @triton.jit
    def _level(w, SHIFT: tl.constexpr, BITS: tl.constexpr):
        """The BITS-bit code at bit SHIFT of w (bits < 23) as an fp32 number without a conversion: the masked word
        read as fp32 is the subnormal code·2**(SHIFT - 149), exactly (fp32 FFMA keeps subnormals at full rate:
        Triton emits fma.rn.f32 without .ftz). One LOP3 per code (module docstring)."""
        return (w & (((1 << BITS) - 1) << SHIFT)).to(tl.float32, bitcast=True)

    @triton.jit
    def _slot(pg, pu, pg1, pu1, wg, wu, SHIFT: tl.constexpr, xs_ptrs, xmask, xmask1, SLOT: tl.constexpr,
              G: tl.constexpr, BITS: tl.constexpr, TOKENS: tl.constexpr, XT: tl.constexpr):
        """Slot SLOT (its code at bit SHIFT of the words wg, wu) of every (row, group) of the block:
        p* (BLOCK_F, BLOCK_G) += code·2**(SHIFT-149) · x_s[t, SLOT, g], one LOP3 per weight and one FFMA per weight
        and row of x; gate and up share each x_s load (BLOCK_G,), which the BLOCK_F rows share too (row t+1 of
        x_s at + XT)."""
        vg = _level(wg, SHIFT, BITS)
        vu = _level(wu, SHIFT, BITS)
        xs = tl.load(xs_ptrs + SLOT * G, mask=xmask, other=0.0)[None, :]
        pg += vg * xs
        pu += vu * xs
        if TOKENS == 2:
            xs1 = tl.load(xs_ptrs + XT + SLOT * G, mask=xmask1, other=0.0)[None, :]
            pg1 += vg * xs1
            pu1 += vu * xs1
        return pg, pu, pg1, pu1

    @triton.jit
    def pick_word(K: tl.constexpr, a0, a1, a2, a3, a4, a5):
        """a_K (K a compile-time index): the word K of a group, from the six named tiles a block carries."""
        if K == 0:
            out = a0
        elif K == 1:
            out = a1
        elif K == 2:
            out = a2
        elif K == 3:
            out = a3
        elif K == 4:
            out = a4
        else:
            out = a5
        return out

    @triton.jit
    def load_words(ptrs, mask, G: tl.constexpr, NW: tl.constexpr):
        """The NW (4 or 6) words of each (row, group) of a block, (BLOCK_F, BLOCK_G) int32 each (word k at + k·G);
        with 4 the last two are the first again (unused)."""
        w0 = tl.load(ptrs, mask=mask, other=0)
        w1 = tl.load(ptrs + G, mask=mask, other=0)
        w2 = tl.load(ptrs + 2 * G, mask=mask, other=0)
        w3 = tl.load(ptrs + 3 * G, mask=mask, other=0)
        if NW == 6:
            w4 = tl.load(ptrs + 4 * G, mask=mask, other=0)
            w5 = tl.load(ptrs + 5 * G, mask=mask, other=0)
        else:
            w4 = w0
            w5 = w0
        return w0, w1, w2, w3, w4, w5

    @triton.jit
    def _group_block(pg, pu, pg1, pu1, g0, g1, g2, g3, g4, g5, u0, u1, u2, u3, u4, u5, xs_ptrs, xmask, xmask1,
                     G: tl.constexpr, NW: tl.constexpr, BITS: tl.constexpr, TOKENS: tl.constexpr,
                     XT: tl.constexpr):
        """Gate (words g*) and up (u*) over a block of whole groups: every slot of each (row, group) (FORMAT)."""
        CPW: tl.constexpr = 32 // BITS
        LOW: tl.constexpr = 23 // BITS  # codes wholly in the low 23 bits: no shift
        for k in tl.static_range(NW):
            wg = pick_word(k, g0, g1, g2, g3, g4, g5)
            wu = pick_word(k, u0, u1, u2, u3, u4, u5)
            for i in tl.static_range(LOW):
                pg, pu, pg1, pu1 = _slot(pg, pu, pg1, pu1, wg, wu, BITS * i, xs_ptrs, xmask, xmask1, k * CPW + i, G,
                                         BITS, TOKENS, XT)
            hg = shr(wg, BITS * LOW)  # the other codes down to bit 0
            hu = shr(wu, BITS * LOW)
            for i in tl.static_range(CPW - LOW):
                pg, pu, pg1, pu1 = _slot(pg, pu, pg1, pu1, hg, hu, BITS * i, xs_ptrs, xmask, xmask1,
                                         k * CPW + LOW + i, G, BITS, TOKENS, XT)
            if BITS == 3:  # the top 2 bits of words 3t, 3t+1, 3t+2 -> bits 0..5 of six: spare slots 10·NW + 2t, +1
                if k % 3 == 0:
                    six_g = shr(wg, 30)
                    six_u = shr(wu, 30)
                elif k % 3 == 1:
                    six_g = six_g | (shr(wg, 28) & 12)
                    six_u = six_u | (shr(wu, 28) & 12)
                else:
                    six_g = six_g | (shr(wg, 26) & 48)
                    six_u = six_u | (shr(wu, 26) & 48)
                    for m in tl.static_range(2):
                        pg, pu, pg1, pu1 = _slot(pg, pu, pg1, pu1, six_g, six_u, 3 * m, xs_ptrs, xmask, xmask1,
                                                 10 * NW + 2 * (k // 3) + m, G, BITS, TOKENS, XT)
        return pg, pu, pg1, pu1

    @triton.jit
    def _sketch_kernel(w_ptr, s_ptr, xs_ptr, xsum_ptr, out_ptr, seg_ptr, T, F, G: tl.constexpr, BITS: tl.constexpr,
                       GROUP: tl.constexpr, TOKENS: tl.constexpr, UNSCALE: tl.constexpr, BLOCK_F: tl.constexpr,
                       BLOCK_G: tl.constexpr, ACT: tl.constexpr, SEG_BLOCKS: tl.constexpr, USE_PDL: tl.constexpr):
        """out[t, f] = |act(g)·u| (ACT: its ffn.ACTIVATIONS index) for BLOCK_F neurons (program_id 1) and rows 2p,
        2p+1 of x (p = program_id 0, TOKENS = 2; 1 for one row): per (row, group) partial sums
        Σ code·x·2**(X_EXP - 149) in (BLOCK_F, BLOCK_G) registers, each block of groups then adding
        step·(partial·UNSCALE - OFF·Σx); one reduction over the groups at the end. All 2·NW words of a block are
        loaded before any is decoded. (Loading block j+1 before decoding block j, registers carried by the loop and a
        barrier to keep the compiler from sinking the loads, measured slower on an H200: 21.2 against 18.2 us at
        Llama-2-7B 3-bit, one row.) SEG_BLOCKS > 0: program_id 1 walks the segments seg_ptr lists instead of every
        block (an MoE layer's routed experts: segment s is rows s·SEG_BLOCKS·BLOCK_F onwards)."""
        pdl_wait(USE_PDL)
        NW: tl.constexpr = BITS * GROUP // 32
        XT: tl.constexpr = GROUP * G  # x_s's row stride
        OFF: tl.constexpr = (1 << (BITS - 1)) - 0.5  # level = (code - OFF)·step
        t0 = tl.program_id(0) * 2
        if SEG_BLOCKS > 0:
            seg = tl.load(seg_ptr + tl.program_id(1) // SEG_BLOCKS)
            offs_f = (seg * SEG_BLOCKS + tl.program_id(1) % SEG_BLOCKS) * BLOCK_F + tl.arange(0, BLOCK_F)
        else:
            offs_f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        mask_f = offs_f < F
        xs_row = xs_ptr + t0 * XT
        acc_g = tl.zeros((BLOCK_F, BLOCK_G), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_F, BLOCK_G), dtype=tl.float32)
        acc_g1 = tl.zeros((BLOCK_F, BLOCK_G), dtype=tl.float32)
        acc_u1 = tl.zeros((BLOCK_F, BLOCK_G), dtype=tl.float32)
        rows = offs_f[:, None] * (2 * NW * G)  # word 0 of the gate; up at + NW·G
        for gb in range(0, G, BLOCK_G):
            offs_g = gb + tl.arange(0, BLOCK_G)
            mask_g = offs_g < G
            mask_g1 = mask_g & (offs_g * 0 + t0 + 1 < T)  # the pair's second row of x exists
            wmask = mask_f[:, None] & mask_g[None, :]
            g0, g1, g2, g3, g4, g5 = load_words(w_ptr + rows + offs_g[None, :], wmask, G, NW)
            u0, u1, u2, u3, u4, u5 = load_words(w_ptr + rows + NW * G + offs_g[None, :], wmask, G, NW)
            srow = offs_f[:, None] * (2 * G) + offs_g[None, :]
            step_g = tl.load(s_ptr + srow, mask=wmask, other=0.0).to(tl.float32)
            step_u = tl.load(s_ptr + srow + G, mask=wmask, other=0.0).to(tl.float32)
            zero = tl.zeros((BLOCK_F, BLOCK_G), dtype=tl.float32)
            pg, pu, pg1, pu1 = _group_block(zero, zero, zero, zero, g0, g1, g2, g3, g4, g5, u0, u1, u2, u3, u4, u5,
                                            xs_row + offs_g, mask_g, mask_g1, G, NW, BITS, TOKENS, XT)
            xsum = tl.load(xsum_ptr + t0 * G + offs_g, mask=mask_g, other=0.0)[None, :]
            acc_g += step_g * (pg * UNSCALE - OFF * xsum)
            acc_u += step_u * (pu * UNSCALE - OFF * xsum)
            if TOKENS == 2:
                xsum1 = tl.load(xsum_ptr + (t0 + 1) * G + offs_g, mask=mask_g1, other=0.0)[None, :]
                acc_g1 += step_g * (pg1 * UNSCALE - OFF * xsum1)
                acc_u1 += step_u * (pu1 * UNSCALE - OFF * xsum1)
        pdl_launch_next(USE_PDL)
        g = tl.sum(acc_g, axis=1)  # (BLOCK_F,)
        u = tl.sum(acc_u, axis=1)
        tl.store(out_ptr + t0 * F + offs_f, tl.abs(apply_act_tl(g, ACT) * u), mask=mask_f)
        if TOKENS == 2:
            g1 = tl.sum(acc_g1, axis=1)
            u1 = tl.sum(acc_u1, axis=1)
            tl.store(out_ptr + (t0 + 1) * F + offs_f, tl.abs(apply_act_tl(g1, ACT) * u1),
                     mask=mask_f & (offs_f * 0 + t0 + 1 < T))

    @triton.jit
    def _topk_kernel(s_ptr, idx_ptr, F, K, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
        """One row of scores (>= 0) -> its K largest, as ascending indices idx[row, :K] (int32). Bisection on the
        fp32 bit pattern (order-preserving for non-negative floats), the row held in registers: each round one
        compare and one block-wide count; it stops as soon as exactly K scores are >= the threshold (about log2 F
        rounds on distinct scores), else after at most 31 rounds at the K-th largest pattern itself, whose ties are
        then taken lowest index first. A prefix sum compacts the kept positions, so the indices come out sorted (a
        gather kernel reading them reads the rows in order)."""
        pdl_wait(USE_PDL)
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        valid = offs < F
        bits = tl.load(s_ptr + row * F + offs, mask=valid, other=0.0).to(tl.int32, bitcast=True)
        bits = tl.where(valid, bits, -1)  # padding sorts below every score
        pdl_launch_next(USE_PDL)
        # invariant: count(bits >= lo) = cnt >= K > count(bits >= hi); +0.0 is pattern 0, +inf 0x7F800000
        lo = tl.program_id(0) * 0
        hi = lo + 0x7F800001
        cnt = tl.sum(valid.to(tl.int32), axis=0)
        while (hi - lo > 1) & (cnt != K):
            mid = lo + (hi - lo) // 2
            c = tl.sum((bits >= mid).to(tl.int32), axis=0)
            lo = tl.where(c >= K, mid, lo)
            cnt = tl.where(c >= K, c, cnt)
            hi = tl.where(c >= K, hi, mid)
        keep = bits > lo
        tie = bits == lo
        need = K - tl.sum(keep.to(tl.int32), axis=0)  # all of the ties when cnt == K
        keep = keep | (tie & (tl.cumsum(tie.to(tl.int32), axis=0) <= need))
        pos = tl.cumsum(keep.to(tl.int32), axis=0) - 1
        tl.store(idx_ptr + row * K + pos, offs, mask=keep)


    @triton.jit
    def _radix_topk_kernel(s_ptr, idx_ptr, F, K, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
        """_topk_kernel's contract (the K largest of one row of scores >= 0 as ascending int32 indices, ties lowest
        index first) in 4 fixed passes instead of up to 31 bisection rounds: a radix select on the fp32 bit pattern,
        one byte a pass from the top. A pass histograms the next byte of the candidates (the scores whose higher
        bytes equal the K-th largest's, found so far) and keeps the byte at which the count from the top reaches K.
        Invariant: above (scores known to be larger) < K <= above + candidates."""
        pdl_wait(USE_PDL)
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        valid = offs < F
        bits = tl.load(s_ptr + row * F + offs, mask=valid, other=0.0).to(tl.int32, bitcast=True)
        pdl_launch_next(USE_PDL)
        bins = tl.arange(0, 256)
        prefix = tl.program_id(0) * 0  # the bytes of the K-th largest pattern found so far
        above = prefix
        for p in tl.static_range(4):
            shift = 24 - 8 * p  # p is a compile-time constant: so is shift (unannotated: one name per unrolled pass)
            cand = valid
            if p > 0:
                cand = valid & ((bits >> (shift + 8)) == prefix)
            # non-candidates land in bin 0 and are taken out again (no histogram mask: older Triton has none)
            hist = tl.histogram(tl.where(cand, (bits >> shift) & 255, 0), 256)  # (256,) int32
            hist -= tl.where(bins == 0, BLOCK - tl.sum(cand.to(tl.int32), axis=0), 0)
            ge = tl.cumsum(hist, axis=0, reverse=True)  # ge[b]: candidates whose byte is >= b
            b = tl.sum((above + ge >= K).to(tl.int32), axis=0) - 1  # the largest such b (ge falls with b)
            above += tl.sum(tl.where(bins == b, ge - hist, 0), axis=0)  # candidates whose byte is > b
            prefix = prefix * 256 + b
        keep = valid & (bits > prefix)
        tie = valid & (bits == prefix)
        keep = keep | (tie & (tl.cumsum(tie.to(tl.int32), axis=0) <= K - above))
        pos = tl.cumsum(keep.to(tl.int32), axis=0) - 1
        tl.store(idx_ptr + row * K + pos, offs, mask=keep)


def prepare_x(x: torch.Tensor, packed: PackedSketch, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, d) -> (x_s (B, group, G) fp32, xsum (B, G) fp32): x permuted once, slot c scaled by 2**(X_EXP - off)."""
    _check_x(x, packed)
    B, d = x.shape
    group, G = packed.group, d // packed.group
    if not use_triton(x, backend):
        xp = x.float() if packed.perm is None else x.float()[:, packed.perm.long()]
        xg = xp.reshape(B, G, group)
        return (xg * packed.scales[None, None, :]).transpose(1, 2).contiguous(), xg.sum(-1)
    xs = torch.empty(B, group, G, device=x.device, dtype=torch.float32)
    xsum = torch.empty(B, G, device=x.device, dtype=torch.float32)
    block_g = min(triton.next_power_of_2(G), max(1, 512 // group))  # (B, G / block_g) programs: a few per row
    perm = packed.perm if packed.perm is not None else xs
    _prep_kernel[(B, triton.cdiv(G, block_g))](x.contiguous(), perm, packed.scales, xs, xsum, d, G,
                                               HAS_PERM=packed.perm is not None, GROUP=group, BLOCK_G=block_g,
                                               num_warps=4, **pdl_kwargs(x))
    return xs, xsum


def sketch_scores(x: torch.Tensor, packed: PackedSketch, backend: str = "auto", config: tuple | None = None,
                  act: str = "silu", segments: torch.Tensor | None = None, segment_rows: int = 0) -> torch.Tensor:
    """|act(x_p·Qgᵀ) · (x_p·Quᵀ)| (B, F) fp32 for x (B, d) in any float dtype: the sketch's estimate of each
    neuron's |activation| (act: the FFN's own, ffn.ACTIVATIONS). Triton (backend "auto" on CUDA, or "triton"): the
    x prep and one scoring kernel (config (block_f, block_g, warps, stages) overrides DEFAULTS[bits]); else the
    torch fallback on the unpacked copy. ``segments`` (m,) int: score only rows s·segment_rows .. (s+1)·segment_rows
    - 1 of each listed s (an MoE layer's routed experts; repeats allowed), 0 elsewhere: what a scoring pass reads
    drops to those rows."""
    _check_x(x, packed)
    check_act(act)
    if segments is not None and (segment_rows <= 0 or packed.shape[0] % segment_rows):
        raise ValueError(f"segment_rows must divide the sketch's {packed.shape[0]} rows, got {segment_rows}")
    if not use_triton(x, backend):
        out = sketch_scores_torch(x, packed, act)
        return out if segments is None else only_segments_(out, segments, segment_rows)
    xs, xsum = prepare_x(x, packed, backend)
    return score_prepared(xs, xsum, packed, config, act, segments, segment_rows)


def score_prepared(xs: torch.Tensor, xsum: torch.Tensor, packed: PackedSketch, config: tuple | None = None,
                   act: str = "silu", segments: torch.Tensor | None = None, segment_rows: int = 0) -> torch.Tensor:
    """The scoring kernel alone on prepare_x's output: (B, F) fp32 (sketch_scores' second launch). Rows of x go
    in pairs, one pair per program_id(0): the pairs of one block of neurons run side by side, so the words
    they all read come from DRAM once and from L2 for the others. ``segments``: sketch_scores'; the grid then
    covers their blocks only (a fixed size for a fixed count: CUDA-graph safe)."""
    B = xs.shape[0]
    F_, d = packed.shape
    G = d // packed.group
    block_f, block_g, warps, stages = config or DEFAULTS[packed.bits]
    block_g = min(block_g, triton.next_power_of_2(G))
    seg_blocks, n_blocks, seg, out = segment_grid(segments, segment_rows, block_f, B, F_, xs)
    _sketch_kernel[(triton.cdiv(B, 2), n_blocks)](
        packed.words, packed.steps, xs, xsum, out, seg, B, F_, G=G, BITS=packed.bits, GROUP=packed.group,
        TOKENS=1 if B == 1 else 2, UNSCALE=2.0 ** (149 - X_EXP), BLOCK_F=block_f, BLOCK_G=block_g,
        ACT=ACTIVATIONS.index(act), SEG_BLOCKS=seg_blocks, num_warps=warps, num_stages=stages, **pdl_kwargs(xs))
    if segments is not None and seg_blocks == 0:  # a segment not made of whole blocks: every row scored, then cut
        only_segments_(out, segments, segment_rows)
    return out


def segment_grid(segments: torch.Tensor | None, segment_rows: int, block_f: int, B: int, F_: int,
                 placeholder: torch.Tensor) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    """A scoring kernel's grid over neuron blocks: (SEG_BLOCKS, blocks, segment list or ``placeholder`` (an unused
    pointer), the (B, F) fp32 output). With segments made of whole blocks the grid covers theirs only and the
    output starts at 0 (rows outside them are never written); else every block, and the caller cuts afterwards."""
    if segments is not None and segment_rows % block_f == 0:
        seg = segments.to(torch.int32)
        return segment_rows // block_f, seg.numel() * (segment_rows // block_f), seg, \
            torch.zeros(B, F_, device=placeholder.device, dtype=torch.float32)
    return 0, triton.cdiv(F_, block_f), placeholder, torch.empty(B, F_, device=placeholder.device,
                                                                 dtype=torch.float32)


def only_segments_(out: torch.Tensor, segments: torch.Tensor, segment_rows: int) -> torch.Tensor:
    """out (B, F) with every row outside the listed segments set to 0, in place (returned)."""
    on = torch.zeros(out.shape[1] // segment_rows, dtype=torch.bool, device=out.device)
    on[segments.long().to(out.device)] = True
    return out.mul_(on.repeat_interleave(segment_rows))


def topk_indices(scores: torch.Tensor, k: int, backend: str = "auto", warps: int | None = None,
                 method: str = TOPK_METHOD) -> torch.Tensor:
    """(B, F) non-negative scores -> (B, k) int32: each row's k largest, ascending indices (ties: lowest index
    first). Triton: one program per row, "radix" (_radix_topk_kernel, 4 passes) or "bisect" (_topk_kernel); else
    a stable torch.sort."""
    B, F_ = scores.shape
    if not 0 < k <= F_:
        raise ValueError(f"k must be in [1, F={F_}], got {k}")
    if method not in TOPK_METHODS:
        raise ValueError(f"method must be one of {TOPK_METHODS}, got {method!r}")
    if not use_triton(scores, backend):  # a stable sort: ties go to the lowest index, as in the kernel
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
        return order.sort(-1).values.to(torch.int32)
    idx = torch.empty(B, k, device=scores.device, dtype=torch.int32)
    block = triton.next_power_of_2(F_)
    warps = warps or min(TOPK_WARPS, max(4, block // 512))  # at least 16 scores per thread
    kernel = _radix_topk_kernel if method == "radix" else _topk_kernel
    kernel[(B,)](scores.contiguous(), idx, F_, k, BLOCK=block, num_warps=warps, **pdl_kwargs(scores))
    return idx


def sketch_topk(x: torch.Tensor, packed: PackedSketch, k: int, backend: str = "auto",
                config: tuple | None = None, act: str = "silu") -> torch.Tensor:
    """(B, k) int32, ascending: each row's k neurons of highest sketch score, computed on x's device without a
    host round trip (sketch_scores, then topk_indices)."""
    F_ = packed.shape[0]
    if not 0 < k <= F_:
        raise ValueError(f"k must be in [1, F={F_}], got {k}")
    return topk_indices(sketch_scores(x, packed, backend, config, act), k, backend)
