"""Bilinear DCLS kernel construction (2 learned dims) on GPUs, in Triton: one launch for
the forward, one for the backward.

Built from PyTorch ops (:func:`dcls_mm.ops.kernel._bilinear_kernel`), a layer's kernel
takes ~40 kernel launches forward and backward and one blocking host-to-device copy;
on an H200 that was 1.8 ms of host time per layer against 0.7 ms for a whole 7x7
depthwise layer, so a ConvNeXt-T-dcls training step was bound by the host. Same
formula, same signatures as the compiled CPU ops ``dcls_mm::bilinear_kernel`` /
``bilinear_kernel_backward`` (:mod:`dcls_mm.ops.kernel` picks one by the tensors'
device). The forward adds the taps with atomics, so the order in which two elements
landing on one tap are summed is not fixed (as with ``scatter_add`` on a GPU).
``TRITON_INTERPRET=1`` runs it on the CPU (tests).
"""
from __future__ import annotations

import contextlib
from typing import Tuple

import torch
from torch import Tensor

from . import triton_conv
from .triton_conv import triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _axis(raw, L, start, count):
        # one learned dim of a position: its fraction, the window index of the tap before
        # it, whether that tap and the one after lie in the window, whether the clamp
        # passes a gradient
        # clamped to [-1 - L // 2, L - L // 2]: a tap there has no weight on the grid
        lo = -1.0 - (L // 2)
        hi = (L - (L // 2)) * 1.0
        pos = tl.minimum(tl.maximum(raw, lo), hi)
        floor = tl.floor(pos)
        index = floor.to(tl.int32) + (L // 2) - start
        # torch.clamp passes the gradient inside its bounds, bounds included
        return (pos - floor, index, (index >= 0) & (index < count),
                (index + 1 >= 0) & (index + 1 < count), (raw >= lo) & (raw <= hi))

    @triton.jit
    def _bilinear_forward(w_ptr, p_ptr, out_ptr, n, K, L0, L1, r0, nr, c0, nc,
                          BLOCK: tl.constexpr):
        # w: (B, K), p: (2, B, K) with n = B * K, out: (B, nr, nc) zeroed
        e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = e < n
        w = tl.load(w_ptr + e, mask=ok, other=0.0)
        f0, i, r_ok0, r_ok1, _ = _axis(tl.load(p_ptr + e, mask=ok, other=0.0), L0, r0, nr)
        f1, j, c_ok0, c_ok1, _ = _axis(tl.load(p_ptr + n + e, mask=ok, other=0.0), L1, c0, nc)
        r_ok0 = ok & r_ok0
        r_ok1 = ok & r_ok1
        base = out_ptr + (e // K).to(tl.int64) * nr * nc
        # tap (a, c) = (w * f0_a) * f1_c, f_0 = 1 - frac, f_1 = frac (the scatter's order)
        w0 = w * (1.0 - f0)
        w1 = w * f0
        tl.atomic_add(base + i * nc + j, w0 * (1.0 - f1), mask=r_ok0 & c_ok0)
        tl.atomic_add(base + i * nc + j + 1, w0 * f1, mask=r_ok0 & c_ok1)
        tl.atomic_add(base + (i + 1) * nc + j, w1 * (1.0 - f1), mask=r_ok1 & c_ok0)
        tl.atomic_add(base + (i + 1) * nc + j + 1, w1 * f1, mask=r_ok1 & c_ok1)

    @triton.jit
    def _bilinear_backward(g_ptr, w_ptr, p_ptr, dw_ptr, dp_ptr, n, K, L0, L1, r0, nr, c0,
                           nc, BLOCK: tl.constexpr):
        e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = e < n
        w = tl.load(w_ptr + e, mask=ok, other=0.0)
        f0, i, r_ok0, r_ok1, pass0 = _axis(tl.load(p_ptr + e, mask=ok, other=0.0), L0, r0, nr)
        f1, j, c_ok0, c_ok1, pass1 = _axis(tl.load(p_ptr + n + e, mask=ok, other=0.0), L1, c0,
                                           nc)
        r_ok0 = ok & r_ok0
        r_ok1 = ok & r_ok1
        base = g_ptr + (e // K).to(tl.int64) * nr * nc
        g00 = tl.load(base + i * nc + j, mask=r_ok0 & c_ok0, other=0.0)
        g01 = tl.load(base + i * nc + j + 1, mask=r_ok0 & c_ok1, other=0.0)
        g10 = tl.load(base + (i + 1) * nc + j, mask=r_ok1 & c_ok0, other=0.0)
        g11 = tl.load(base + (i + 1) * nc + j + 1, mask=r_ok1 & c_ok1, other=0.0)
        # tap (a, c) = w * f0_a * f1_c, f_0 = 1 - frac, f_1 = frac; floor() is constant
        row0 = g00 * (1.0 - f1) + g01 * f1
        row1 = g10 * (1.0 - f1) + g11 * f1
        tl.store(dw_ptr + e, row0 * (1.0 - f0) + row1 * f0, mask=ok)
        tl.store(dp_ptr + e, tl.where(pass0, w * (row1 - row0), 0.0), mask=ok)
        tl.store(dp_ptr + n + e,
                 tl.where(pass1, w * ((g01 - g00) * (1.0 - f0) + (g11 - g10) * f0), 0.0),
                 mask=ok)


BLOCK = 256


def available(P: Tensor) -> bool:
    """Whether the Triton construction can build a kernel from positions ``P`` (float32,
    on a GPU Triton supports, or on the CPU under ``TRITON_INTERPRET=1``)."""
    return P.dtype == torch.float32 and triton_conv.available(P.device, P.dtype)


def _device(t: Tensor):
    # Triton launches on the current device, which need not be the tensors' one
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def bilinear_kernel(weight: Tensor, P: Tensor, L0: int, L1: int, r0: int, nr: int, c0: int,
                    nc: int) -> Tensor:
    """Window ``[r0, r0 + nr) x [c0, c0 + nc)`` of the bilinear kernels of ``weight``
    ``(B, K)`` at positions ``P`` ``(2, B, K)`` (centred), as ``(B, nr, nc)`` float32."""
    w, p = weight.float().contiguous(), P.float().contiguous()
    out = torch.zeros(w.shape[0], nr, nc, device=w.device, dtype=torch.float32)
    n = w.numel()
    with _device(w):
        _bilinear_forward[(triton.cdiv(n, BLOCK),)](w, p, out, n, w.shape[1], L0, L1, r0, nr,
                                                    c0, nc, BLOCK=BLOCK)
    return out


def bilinear_kernel_backward(grad: Tensor, weight: Tensor, P: Tensor, L0: int, L1: int,
                             r0: int, nr: int, c0: int, nc: int) -> Tuple[Tensor, Tensor]:
    """Gradients wrt ``weight`` and ``P`` of :func:`bilinear_kernel` for the window's
    gradient ``grad`` ``(B, nr, nc)``."""
    g, w, p = grad.float().contiguous(), weight.float().contiguous(), P.float().contiguous()
    dw, dp = torch.empty_like(w), torch.empty_like(p)
    n = w.numel()
    with _device(w):
        _bilinear_backward[(triton.cdiv(n, BLOCK),)](g, w, p, dw, dp, n, w.shape[1], L0, L1, r0,
                                                     nr, c0, nc, BLOCK=BLOCK)
    return dw, dp
