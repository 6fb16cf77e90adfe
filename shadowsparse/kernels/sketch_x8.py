"""The sketch's scoring pass with int8 activations and integer dot products (dp4a): the engine's by default
(verify.x_bits = 8). kernels/sketch.py's fp32 kernel (x_bits null) spends a LOP3 and an FFMA per weight and row of x;
this one four weights per dp4a. H100, Llama-2-7B shapes: the sketch's time in the step 0.59 -> 0.51 ms at batch 1,
0.97 -> 0.54 at 2, 2.37 -> 1.13 at 8 (docs/benchmarks.md, session 16).

    pack_sketch_x8(gate, up)       MidriseCodes of W_gate, W_up (F, d) -> PackedSketchX8 (same bytes as PackedSketch)
    from_packed(packed)            a kernels/sketch.py PackedSketch in this layout
    prepare_x8(x, packed)          x (B, d) -> (xq words (B, 16, G) int32, scale (B, G) fp32, qsum (B, G) int32)
    score_prepared_x8(...)         the scoring kernel: (B, F) fp32 |act(g)·u|
    sketch_scores_x8(x, packed)    both; the torch fallback computes the same integers exactly

THE ESTIMATE. x_p (x in the codes' act order) is quantized per group of 64 channels, symmetric, 8 bits:
scale = max|x_p[group]| / 127, q = clamp(floor(x_p·(127 / max) + 1/2), -127, 127) (the division correctly rounded
and no FMA contraction in both paths, so the kernel and the fallback produce the same q). A neuron's pre-activation is
Σ_g step_g · scale_g · (Σ_c code_c·q_c - OFF·Σ_c q_c), OFF = 2**(bits-1) - 1/2: the inner sums are exact integers
(at most 64·7·127), only the sum over groups is floating point. The int8 rounding of x adds ~1/(2·127) of a group's
largest |x| per channel, against the 3-bit copy's ~1/8 of a row's range per weight.

FORMAT (words (F, 2, NW, G) int32, NW = 6 at 3 bits, 4 at 2; steps (F, 2, G) fp16). Each int32 word is four byte
lanes; dp4a multiplies the four unsigned lanes of a masked word by the four signed int8 lanes of an x word and adds
the sum to an int32. x word e (e = 0..15) of a group holds q of slots 4e .. 4e+3 (lane j: slot 4e + j), so every
masked word below lines its codes up with one x word, each code shifted left by a fixed amount that the sum undoes
with an exact right shift.
  3 bits, word k, lane j: bits 0..2 slot 8k + j (x word 2k); bits 3..5 slot 8k + 4 + j (x word 2k+1, codes ·8);
         bits 6..7: for k < 4 the low two bits of slot 48 + 4k + j (x word 12 + k, ·64); for k = 4, 5 the high bit of
         slot 48 + 8(k-4) + j (bit 6) and of slot 52 + 8(k-4) + j (bit 7), brought down to bit 2 (·4 = its weight).
  2 bits, word k, lane j: bits 2e .. 2e+1 slot 16k + 4e + j (x word 4k + e); e = 2, 3 after one shift of the word.
Per 64 weights and row of x: 20 (3-bit) or 16 (2-bit) dp4a, as many LOP3 and a few shifts, instead of 64 FFMAs
and ~70 integer operations.

dp4a is inline PTX (dp4a.u32.s32); under TRITON_INTERPRET=1 the same sum is computed with shifts and multiplies.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ..quant import X8_MAX, MidriseCodes, gptq_act_order_codes, quantize_rows_codes, quantize_x8
from .common import tl, triton, use_triton
from .ffn import ACTIVATIONS, apply_act
from .pdl import pdl_kwargs, pdl_launch_next, pdl_wait
from .sketch import SketchWords, check_act, check_format, only_segments_, paired_steps, segment_grid

GROUP = 64
XWORDS = GROUP // 4  # int32 words of int8 x per group
# (block_f, block_g, warps, stages) per bits, the fp32 kernel's best (not swept for this kernel yet:
# benchmarks/sketch_kernel.py times X8_CONFIGS); block_g is capped at G's power of two
DEFAULTS = {2: (16, 32, 4, 1), 3: (16, 32, 4, 1)}
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # no inline PTX in the interpreter


@dataclass
class PackedSketchX8(SketchWords):
    """A layer's packed sketch in the dp4a layout (module docstring, FORMAT); the torch fallback's codes (2, F, G,
    group) fp32 in x_p's column order are cached in _codes."""
    group: int = GROUP
    _codes: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def codes(self) -> torch.Tensor:
        """(2, F, G, group) fp32: the codes of gate and up in x_p's column order, unpacked (cached)."""
        if self._codes is None:
            self._codes = unpack_codes_x8(self).float()
        return self._codes


def _slot_fields(bits: int) -> list[tuple[int, int, int, int, int]]:
    """(word, bit, width, slot, code bit) for every field of a group's words, lane 0 (lane j: bit + 8j, slot + j):
    the FORMAT of the module docstring as data, shared by the packer and the unpacker."""
    out = []
    if bits == 3:
        for k in range(6):
            out += [(k, 0, 3, 8 * k, 0), (k, 3, 3, 8 * k + 4, 0)]
            if k < 4:
                out.append((k, 6, 2, 48 + 4 * k, 0))
            else:
                out += [(k, 6, 1, 48 + 8 * (k - 4), 2), (k, 7, 1, 52 + 8 * (k - 4), 2)]
    else:
        out = [(k, 2 * e, 2, 16 * k + 4 * e, 0) for k in range(4) for e in range(4)]
    return out


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes (F, d) uint8 -> words (F, NW, G) int32."""
    F_, d = codes.shape
    G, nw = d // GROUP, bits * GROUP // 32
    c = codes.to(torch.int64).reshape(F_, G, GROUP)
    words = torch.zeros(F_, G, nw, dtype=torch.int64, device=codes.device)
    for k, bit, width, slot, cbit in _slot_fields(bits):
        for j in range(4):
            field_ = (c[:, :, slot + j] >> cbit) & ((1 << width) - 1)
            words[:, :, k] |= field_ << (bit + 8 * j)
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words)
    return words.to(torch.int32).permute(0, 2, 1)


def unpack_codes_x8(packed: PackedSketchX8) -> torch.Tensor:
    """(2, F, G, group) uint8: the codes read back from the words."""
    w = packed.words.to(torch.int64) & 0xFFFFFFFF  # (F, 2, NW, G)
    F_, _, _, G = w.shape
    codes = torch.zeros(F_, 2, G, GROUP, dtype=torch.int64, device=w.device)
    for k, bit, width, slot, cbit in _slot_fields(packed.bits):
        for j in range(4):
            codes[:, :, :, slot + j] |= ((w[:, :, k, :] >> (bit + 8 * j)) & ((1 << width) - 1)) << cbit
    return codes.permute(1, 0, 2, 3).to(torch.uint8)


def pack_sketch_x8(gate: MidriseCodes, up: MidriseCodes) -> PackedSketchX8:
    """The dp4a-layout sketch of a gated FFN from the codes of W_gate and W_up (same bits, group, permutation)."""
    steps = paired_steps(gate, up)
    words = torch.stack([_pack(gate.codes, gate.bits), _pack(up.codes, gate.bits)], dim=1)
    perm = None if gate.perm is None else gate.perm.to(torch.int32)
    return PackedSketchX8(words.contiguous(), steps, perm, gate.bits, gate.group)


def from_packed(packed) -> PackedSketchX8:
    """A kernels/sketch.py PackedSketch's codes, steps and permutation in this layout (the same estimate but for
    the int8 rounding of x)."""
    from .sketch import unpack_codes
    codes = unpack_codes(packed)  # (2, F, d) uint8 in x_p's order
    perm = None if packed.perm is None else packed.perm.long()
    gate, up = (MidriseCodes(codes[i], packed.steps[:, i].float(), packed.bits, packed.group, perm) for i in (0, 1))
    return pack_sketch_x8(gate, up)


def sketch_preacts_x8_torch(x: torch.Tensor, packed: PackedSketchX8) -> torch.Tensor:
    """(2, B, F) fp32 pre-activations of gate and up from exact integer group sums (module docstring)."""
    q, scale = quantize_x8(x, packed.perm, packed.group)  # (B, G, 64), (B, G)
    codes = packed.codes()  # (2, F, G, 64)
    dots = torch.einsum("bgc,mfgc->mbfg", q, codes)  # exact: integers below 2**24
    off2 = 2 ** packed.bits - 1
    t2 = 2 * dots - off2 * q.sum(-1)[None, :, None, :]  # 2·(Σ code·q - OFF·Σq), exact
    steps = packed.steps.float().permute(1, 0, 2)  # (2, F, G)
    # elementwise and a plain sum, not a GEMM: a GEMM may run in TF32 on a GPU (t2 has up to 17 significant bits)
    return (t2 * steps[:, None] * (0.5 * scale)[None, :, None, :]).sum(-1)


def sketch_scores_x8_torch(x: torch.Tensor, packed: PackedSketchX8, act: str = "silu") -> torch.Tensor:
    pre = sketch_preacts_x8_torch(x, packed)
    return (apply_act(pre[0], act) * pre[1]).abs()


if triton is not None:
    from .ffn import apply_act_tl
    from .sketch import load_words, load_x_groups, pick_word, shr  # the fp32 kernel's word loads and helpers, shared

    @triton.jit
    def _dp4a(a, b, c, ASM: tl.constexpr):
        """c + Σ_j a.u8[j]·b.s8[j] per element (int32 tensors of one shape after broadcasting): one dp4a
        instruction, or shifts and multiplies in the interpreter."""
        if ASM:
            out = tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                            dtype=tl.int32, is_pure=True, pack=1)
        else:
            out = c
            for j in tl.static_range(4):
                aj = (a >> (8 * j)) & 255
                bj = (b << (24 - 8 * j)) >> 24  # the signed byte j
                out += aj * bj
        return out

    @triton.jit
    def _prep_x8_kernel(x_ptr, perm_ptr, xq_ptr, scale_ptr, qsum_ptr, D, G, HAS_PERM: tl.constexpr,
                        GROUP: tl.constexpr, BLOCK_G: tl.constexpr, QMAX: tl.constexpr, USE_PDL: tl.constexpr):
        """One row t of x, BLOCK_G groups: xq[t, e, g] (int32 of four int8 lanes: q of slots 4e..4e+3),
        scale[t, g], qsum[t, g] (quantize_x8's numbers)."""
        pdl_wait(USE_PDL)
        t = tl.program_id(0)
        xv, offs_g, _, mask = load_x_groups(x_ptr, perm_ptr, t, D, G, HAS_PERM, GROUP, BLOCK_G)
        pdl_launch_next(USE_PDL)
        amax = tl.max(tl.abs(xv), axis=1)  # (BLOCK_G,)
        qmax = tl.full(amax.shape, QMAX, tl.float32)  # quant.X8_MAX
        inv = tl.where(amax > 0, tl.math.div_rn(qmax, tl.maximum(amax, 1e-30)), 0.0)
        q = tl.minimum(tl.maximum(tl.floor(xv * inv[:, None] + 0.5), -QMAX), QMAX).to(tl.int32)
        lanes = tl.reshape(q & 255, (BLOCK_G, GROUP // 4, 4))
        shift = tl.arange(0, 4) * 8
        words = tl.sum(lanes << shift[None, None, :], axis=2)  # (BLOCK_G, 16): disjoint lanes, so sum == or
        offs_e = tl.arange(0, GROUP // 4)
        gmask = offs_g < G
        tl.store(xq_ptr + t * (GROUP // 4) * G + offs_e[None, :] * G + offs_g[:, None], words, mask=mask)
        tl.store(scale_ptr + t * G + offs_g, tl.math.div_rn(amax, qmax), mask=gmask)
        tl.store(qsum_ptr + t * G + offs_g, tl.sum(q, axis=1), mask=gmask)

    @triton.jit
    def _ext(ag, au, wg, wu, MASK: tl.constexpr, x, ASM: tl.constexpr):
        """One masked field of the gate and up words against one x word: the two dp4a accumulations."""
        return _dp4a(wg & MASK, x, ag, ASM), _dp4a(wu & MASK, x, au, ASM)

    @triton.jit
    def _dots(g0, g1, g2, g3, g4, g5, u0, u1, u2, u3, u4, u5, xq_ptrs, xmask, G: tl.constexpr,
              BITS: tl.constexpr, ASM: tl.constexpr):
        """Σ_c code_c·q_c of every (row, group) of the block for gate and up (int32, exact; FORMAT)."""
        zero = tl.zeros(g0.shape, dtype=tl.int32)
        a1g, a1u, a8g, a8u, a64g, a64u = zero, zero, zero, zero, zero, zero
        if BITS == 3:
            for k in tl.static_range(6):
                wg = pick_word(k, g0, g1, g2, g3, g4, g5)
                wu = pick_word(k, u0, u1, u2, u3, u4, u5)
                xa = tl.load(xq_ptrs + (2 * k) * G, mask=xmask, other=0)[None, :]
                xb = tl.load(xq_ptrs + (2 * k + 1) * G, mask=xmask, other=0)[None, :]
                a1g, a1u = _ext(a1g, a1u, wg, wu, 0x07070707, xa, ASM)
                a8g, a8u = _ext(a8g, a8u, wg, wu, 0x38383838, xb, ASM)
                if k < 4:
                    xc = tl.load(xq_ptrs + (12 + k) * G, mask=xmask, other=0)[None, :]
                    a64g, a64u = _ext(a64g, a64u, wg, wu, -0x3F3F3F40, xc, ASM)  # 0xC0C0C0C0
                else:  # the high bits at 6 and 7, moved to bit 2 (their weight 4 in the code)
                    x6 = tl.load(xq_ptrs + (12 + 2 * (k - 4)) * G, mask=xmask, other=0)[None, :]
                    x7 = tl.load(xq_ptrs + (13 + 2 * (k - 4)) * G, mask=xmask, other=0)[None, :]
                    a1g, a1u = _ext(a1g, a1u, shr(wg, 4), shr(wu, 4), 0x04040404, x6, ASM)
                    a1g, a1u = _ext(a1g, a1u, shr(wg, 5), shr(wu, 5), 0x04040404, x7, ASM)
            tg = a1g + (a8g >> 3) + (a64g >> 6)
            tu = a1u + (a8u >> 3) + (a64u >> 6)
        else:
            for k in tl.static_range(4):
                wg = pick_word(k, g0, g1, g2, g3, g4, g5)
                wu = pick_word(k, u0, u1, u2, u3, u4, u5)
                hg = shr(wg, 4)
                hu = shr(wu, 4)
                x0 = tl.load(xq_ptrs + (4 * k) * G, mask=xmask, other=0)[None, :]
                x1 = tl.load(xq_ptrs + (4 * k + 1) * G, mask=xmask, other=0)[None, :]
                x2 = tl.load(xq_ptrs + (4 * k + 2) * G, mask=xmask, other=0)[None, :]
                x3 = tl.load(xq_ptrs + (4 * k + 3) * G, mask=xmask, other=0)[None, :]
                a1g, a1u = _ext(a1g, a1u, wg, wu, 0x03030303, x0, ASM)
                a8g, a8u = _ext(a8g, a8u, wg, wu, 0x0C0C0C0C, x1, ASM)
                a1g, a1u = _ext(a1g, a1u, hg, hu, 0x03030303, x2, ASM)
                a8g, a8u = _ext(a8g, a8u, hg, hu, 0x0C0C0C0C, x3, ASM)
            tg = a1g + (a8g >> 2)
            tu = a1u + (a8u >> 2)
        return tg, tu

    @triton.jit
    def _sketch_x8_kernel(w_ptr, s_ptr, xq_ptr, scale_ptr, qsum_ptr, out_ptr, T, F, G: tl.constexpr,
                          BITS: tl.constexpr, GROUP: tl.constexpr, TOKENS: tl.constexpr, BLOCK_F: tl.constexpr,
                          BLOCK_G: tl.constexpr, ACT: tl.constexpr, ASM: tl.constexpr, seg_ptr,
                          SEG_BLOCKS: tl.constexpr, USE_PDL: tl.constexpr):
        """out[t, f] = |act(g)·u| for BLOCK_F neurons (program_id 1) and rows 2p, 2p+1 of x (TOKENS = 2; one row:
        1): per (row, group) exact integer dots (_dots), then step·scale/2·(2·dot - (2**BITS - 1)·qsum) added in
        fp32; one reduction over the groups at the end. SEG_BLOCKS > 0: program_id 1 walks the segments seg_ptr
        lists (an MoE layer's routed experts: segment s is rows s·SEG_BLOCKS·BLOCK_F onwards), as the fp32 kernel."""
        pdl_wait(USE_PDL)
        NW: tl.constexpr = BITS * GROUP // 32
        XW: tl.constexpr = GROUP // 4
        OFF2: tl.constexpr = (1 << BITS) - 1
        t0 = tl.program_id(0) * 2
        if SEG_BLOCKS > 0:
            seg = tl.load(seg_ptr + tl.program_id(1) // SEG_BLOCKS)
            offs_f = (seg * SEG_BLOCKS + tl.program_id(1) % SEG_BLOCKS) * BLOCK_F + tl.arange(0, BLOCK_F)
        else:
            offs_f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        mask_f = offs_f < F
        acc_g = tl.zeros((BLOCK_F, BLOCK_G), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_F, BLOCK_G), dtype=tl.float32)
        acc_g1 = tl.zeros((BLOCK_F, BLOCK_G), dtype=tl.float32)
        acc_u1 = tl.zeros((BLOCK_F, BLOCK_G), dtype=tl.float32)
        rows = offs_f[:, None] * (2 * NW * G)
        for gb in range(0, G, BLOCK_G):
            offs_g = gb + tl.arange(0, BLOCK_G)
            mask_g = offs_g < G
            wmask = mask_f[:, None] & mask_g[None, :]
            g0, g1, g2, g3, g4, g5 = load_words(w_ptr + rows + offs_g[None, :], wmask, G, NW)
            u0, u1, u2, u3, u4, u5 = load_words(w_ptr + rows + NW * G + offs_g[None, :], wmask, G, NW)
            srow = offs_f[:, None] * (2 * G) + offs_g[None, :]
            step_g = tl.load(s_ptr + srow, mask=wmask, other=0.0).to(tl.float32)
            step_u = tl.load(s_ptr + srow + G, mask=wmask, other=0.0).to(tl.float32)
            tg, tu = _dots(g0, g1, g2, g3, g4, g5, u0, u1, u2, u3, u4, u5, xq_ptr + t0 * XW * G + offs_g, mask_g,
                           G, BITS, ASM)
            qs = tl.load(qsum_ptr + t0 * G + offs_g, mask=mask_g, other=0)[None, :]
            sc = 0.5 * tl.load(scale_ptr + t0 * G + offs_g, mask=mask_g, other=0.0)[None, :]
            acc_g += step_g * sc * (2 * tg - OFF2 * qs).to(tl.float32)
            acc_u += step_u * sc * (2 * tu - OFF2 * qs).to(tl.float32)
            if TOKENS == 2:
                mask_g1 = mask_g & (offs_g * 0 + t0 + 1 < T)
                tg1, tu1 = _dots(g0, g1, g2, g3, g4, g5, u0, u1, u2, u3, u4, u5,
                                 xq_ptr + (t0 + 1) * XW * G + offs_g, mask_g1, G, BITS, ASM)
                qs1 = tl.load(qsum_ptr + (t0 + 1) * G + offs_g, mask=mask_g1, other=0)[None, :]
                sc1 = 0.5 * tl.load(scale_ptr + (t0 + 1) * G + offs_g, mask=mask_g1, other=0.0)[None, :]
                acc_g1 += step_g * sc1 * (2 * tg1 - OFF2 * qs1).to(tl.float32)
                acc_u1 += step_u * sc1 * (2 * tu1 - OFF2 * qs1).to(tl.float32)
        pdl_launch_next(USE_PDL)
        g = tl.sum(acc_g, axis=1)
        u = tl.sum(acc_u, axis=1)
        tl.store(out_ptr + t0 * F + offs_f, tl.abs(apply_act_tl(g, ACT) * u), mask=mask_f)
        if TOKENS == 2:
            g1 = tl.sum(acc_g1, axis=1)
            u1 = tl.sum(acc_u1, axis=1)
            tl.store(out_ptr + (t0 + 1) * F + offs_f, tl.abs(apply_act_tl(g1, ACT) * u1),
                     mask=mask_f & (offs_f * 0 + t0 + 1 < T))


def prepare_x8(x: torch.Tensor, packed: PackedSketchX8,
               backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (B, d) -> (xq (B, 16, G) int32 words of int8 lanes, scale (B, G) fp32, qsum (B, G) int32)."""
    if x.dim() != 2 or x.shape[1] != packed.shape[1]:
        raise ValueError(f"x must be (B, d) with d={packed.shape[1]}, got {tuple(x.shape)}")
    B, d = x.shape
    G = d // packed.group
    if not use_triton(x, backend):
        q, scale = quantize_x8(x, packed.perm, packed.group)
        lanes = (q.to(torch.int64) & 255).reshape(B, G, XWORDS, 4) << (8 * torch.arange(4, device=x.device))
        words = lanes.sum(-1)
        words = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
        return words.transpose(1, 2).contiguous(), scale, q.sum(-1).to(torch.int32)
    xq = torch.empty(B, XWORDS, G, device=x.device, dtype=torch.int32)
    scale = torch.empty(B, G, device=x.device, dtype=torch.float32)
    qsum = torch.empty(B, G, device=x.device, dtype=torch.int32)
    block_g = min(triton.next_power_of_2(G), 8)
    perm = packed.perm if packed.perm is not None else xq
    _prep_x8_kernel[(B, triton.cdiv(G, block_g))](x.contiguous(), perm, xq, scale, qsum, d, G,
                                                  HAS_PERM=packed.perm is not None, GROUP=packed.group,
                                                  BLOCK_G=block_g, QMAX=float(X8_MAX), num_warps=4,
                                                  enable_fp_fusion=False,
                                                  **pdl_kwargs(x))  # no FMA: x·inv + 1/2 rounds twice, as in torch
    return xq, scale, qsum


def score_prepared_x8(xq: torch.Tensor, scale: torch.Tensor, qsum: torch.Tensor, packed: PackedSketchX8,
                      config: tuple | None = None, act: str = "silu", segments: torch.Tensor | None = None,
                      segment_rows: int = 0, asm: bool | None = None) -> torch.Tensor:
    """The scoring kernel on prepare_x8's output: (B, F) fp32. segments: sketch.score_prepared's (only the listed
    segments' rows are read, 0 elsewhere). asm None: dp4a on a GPU, the emulation in the interpreter."""
    B = xq.shape[0]
    F_, d = packed.shape
    G = d // packed.group
    block_f, block_g, warps, stages = config or DEFAULTS[packed.bits]
    block_g = min(block_g, triton.next_power_of_2(G))
    seg_blocks, n_blocks, seg, out = segment_grid(segments, segment_rows, block_f, B, F_, xq)
    _sketch_x8_kernel[(triton.cdiv(B, 2), n_blocks)](
        packed.words, packed.steps, xq, scale, qsum, out, B, F_, G=G, BITS=packed.bits, GROUP=packed.group,
        TOKENS=1 if B == 1 else 2, BLOCK_F=block_f, BLOCK_G=block_g, ACT=ACTIVATIONS.index(act),
        ASM=(not INTERPRET) if asm is None else asm, seg_ptr=seg, SEG_BLOCKS=seg_blocks, num_warps=warps,
        num_stages=stages, **pdl_kwargs(xq))
    if segments is not None and seg_blocks == 0:  # segments not made of whole blocks: every row scored, then cut
        only_segments_(out, segments, segment_rows)
    return out


def sketch_scores_x8(x: torch.Tensor, packed: PackedSketchX8, backend: str = "auto", config: tuple | None = None,
                     act: str = "silu", segments: torch.Tensor | None = None, segment_rows: int = 0) -> torch.Tensor:
    """|act(pre_g)·pre_u| (B, F) fp32 for x (B, d): the int8-x estimate (module docstring); ``segments``:
    sketch.sketch_scores'."""
    check_act(act)
    if segments is not None and (segment_rows <= 0 or packed.shape[0] % segment_rows):
        raise ValueError(f"segment_rows must divide the sketch's {packed.shape[0]} rows, got {segment_rows}")
    if not use_triton(x, backend):
        out = sketch_scores_x8_torch(x, packed, act)
        return out if segments is None else only_segments_(out, segments, segment_rows)
    return score_prepared_x8(*prepare_x8(x, packed, backend), packed, config, act, segments, segment_rows)


def sketch_from_weights_x8(w_gate: torch.Tensor, w_up: torch.Tensor, bits: int = 3, group: int = GROUP,
                           hessian: torch.Tensor | None = None, damp: float = 0.01) -> PackedSketchX8:
    """sketch.sketch_from_weights' codes (GPTQ in act order given a hessian, else round-to-nearest) in this
    module's layout."""
    check_format(bits, group, w_gate.shape[1])
    if hessian is None:
        return pack_sketch_x8(quantize_rows_codes(w_gate, bits, group), quantize_rows_codes(w_up, bits, group))
    return pack_sketch_x8(gptq_act_order_codes(w_gate, hessian, bits, group, damp),
                          gptq_act_order_codes(w_up, hessian, bits, group, damp))
