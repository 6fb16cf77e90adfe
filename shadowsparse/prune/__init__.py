"""Static weight sparsity: find a mask per decoder linear (metrics), shape it (patterns), size it per matrix
(allocation), apply it in place (sparsify_), and squash it into plain weights for export (squash_).

Finding a mask is separate from accelerating it: the kernels issue reads these weights; here they are zeros.
"""
from .patterns import Pattern
from .sparsify import SparsityConfig, squash_, sparsify_

__all__ = ["Pattern", "SparsityConfig", "sparsify_", "squash_"]
