"""The double-backward path shared by dcls-mm's compiled autograd Functions.

A compiled backward (C++ kernel gradient, kernel construction) has no derivative of its
own. When the backward runs with ``create_graph=True`` (gradient penalties, Hessian-vector
products) each Function instead differentiates a twice-differentiable PyTorch formula of
the same function, through :func:`formula_gradients`.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor


def formula_gradients(out: Tensor, inputs: Sequence[Tensor], needs: Sequence[bool],
                      grad: Tensor) -> Tuple[Optional[Tensor], ...]:
    """Gradients of ``out`` wrt ``inputs`` with ``create_graph=True``.

    Args:
        out: the function's output recomputed from ``inputs`` by differentiable PyTorch ops.
        inputs: the Function's tensor inputs, in ``forward``'s order.
        needs: ``ctx.needs_input_grad`` for those inputs.
        grad: the gradient wrt ``out``.

    Returns:
        One entry per input: its gradient (itself differentiable), or ``None`` where
        ``needs`` is false.
    """
    needed = [t for t, need in zip(inputs, needs) if need]
    grads = iter(torch.autograd.grad(out, needed, grad, create_graph=True))
    return tuple(next(grads) if need else None for need in needs)
