"""A dense pass that stops once the last module a caller reads has run.

Calibration passes (the sketch's X^T X, its thresholds' estimates, the FFN recordings) read layer inputs through
hooks; the layers after the last one read, the final norm and the LM head are wasted work. On SmolLM2-135M the
LM head alone is ~19% of a forward's multiply-adds (49,152 x 576 per token against ~119M in the 30 layers)."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a hook to end a forward pass whose remaining work nobody reads."""


@contextmanager
def stop_after(module: nn.Module):
    """Inside the block, a forward pass raises StopForward as soon as ``module`` has returned (its own forward hooks
    registered before this one have run)."""
    def stop(mod, args, out):
        raise StopForward
    handle = module.register_forward_hook(stop)
    try:
        yield
    finally:
        handle.remove()


def forward_until(model: nn.Module, ids: torch.Tensor, last: nn.Module, **kwargs) -> None:
    """model(input_ids=ids, **kwargs), ended once ``last`` has run; the caller's hooks keep what they read (the
    output is not computed)."""
    with stop_after(last):
        try:
            model(input_ids=ids, **kwargs)
        except StopForward:
            pass
