"""Programmatic dependent launch (PDL, sm_90 and later) for the decode kernels.

A gated decode step is about ten small kernels per layer. In a CUDA graph each kernel's programs are scheduled
only after the previous kernel has finished and drained, a gap of about a microsecond per boundary that weight
bytes cannot hide at batch 1. Launched with PDL, a kernel is scheduled while the previous one still runs: its
programs start and block in gdc_wait until the previous grid has completed and its writes are visible; each
kernel lets its successor launch (gdc_launch_dependents) once its programs have finished their main loop.
Correct because every kernel launched this way waits at the start of every program, before it reads or writes
anything (reads of tensors an earlier kernel writes, and writes of tensors an earlier kernel still reads, are both
ordered after the wait); kernels launched without PDL (cuBLAS, torch ops) keep full stream order. Off where Triton
lacks the instructions, on CPUs (the interpreter) and on GPUs before Hopper; SHADOWSPARSE_PDL=0 turns it off (the
benchmark measures both).
"""
from __future__ import annotations

import functools
import os

import torch

from .common import tl, triton

if triton is not None:

    HAS_GDC = hasattr(tl.extra, "cuda") and hasattr(tl.extra.cuda, "gdc_wait")  # this Triton has the instructions

    @triton.jit
    def pdl_wait(USE_PDL: tl.constexpr):
        """First statement of a PDL-launched kernel: wait until the previous kernel has completed."""
        if USE_PDL:
            tl.extra.cuda.gdc_wait()

    @triton.jit
    def pdl_launch_next(USE_PDL: tl.constexpr):
        """After a kernel's main loop: the next kernel may launch once every program has got here. Not earlier:
        launched at the start, the next kernels' waiting programs pile up on the SMs and take the slots that
        spread the running kernel's programs evenly (measured: OPT-13B gated step 6.02 -> 6.51 ms)."""
        if USE_PDL:
            tl.extra.cuda.gdc_launch_dependents()
else:  # pragma: no cover - machines without triton
    HAS_GDC = False


@functools.lru_cache(maxsize=None)
def _hopper_or_later(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def pdl_enabled(t: torch.Tensor) -> bool:
    """Whether kernels working on ``t`` are launched with PDL (module docstring)."""
    if not (HAS_GDC and t.is_cuda) or os.environ.get("SHADOWSPARSE_PDL", "1") == "0":
        return False
    return _hopper_or_later(t.device.index if t.device.index is not None else torch.cuda.current_device())


def pdl_kwargs(t: torch.Tensor) -> dict:
    """Launch keywords of a kernel with a ``USE_PDL`` constexpr: both on or both off."""
    on = pdl_enabled(t)
    return {"USE_PDL": on, "launch_pdl": on} if on else {"USE_PDL": False}
