"""DCLS kernel construction (2 learned dims) on GPUs, in Triton: one launch for the
forward, one for the backward.

Built from PyTorch ops (:mod:`dcls_mm.ops.kernel`), a layer's kernel takes dozens of
kernel launches forward and backward; on an H200 a bilinear layer's construction took
1.8 ms of host time (0.5 ms with these kernels) against 0.7 ms for a whole 7x7
depthwise layer, and a gaussian one 2.95 ms, so a ConvNeXt-T-dcls training step was
bound by the host. Same formulas as the PyTorch ops, signatures like the compiled CPU
ops (:mod:`dcls_mm.ops.kernel` picks by the tensors' device):

- bilinear: one program per block of elements; the forward adds the 4 taps of each with
  atomics, so the order in which two elements landing on one tap are summed is not
  fixed (as with ``scatter_add`` on a GPU). The default on GPUs (measured).
- triangle / gaussian: one program per channel: its 1-D profiles, the K-sum as a
  float32 ``tl.dot`` (no TF32) of (K x L) tiles, the gaussian cut; the backward the
  same sums transposed. Only with ``DCLS_MM_ROUTES=construct=triton`` until measured on
  a GPU.

``TRITON_INTERPRET=1`` runs them on the CPU (tests).
"""
from __future__ import annotations

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


    @triton.jit
    def _profiles(p_ptr, s_ptr, e, k_ok, L, OFFSET, GAUSSIAN: tl.constexpr, BL: tl.constexpr):
        # one learned dim's profiles a[k, i] of a channel (kernel.profile_1d) with what
        # their derivatives need; zero on padded k and i
        pos = tl.load(p_ptr + e, mask=k_ok, other=0.0) + (L // 2)
        raw = tl.load(s_ptr + e, mask=k_ok, other=0.0)
        width = tl.abs(raw) + OFFSET
        grid = tl.arange(0, BL)
        u = grid.to(tl.float32)[None, :] - pos[:, None]
        if GAUSSIAN:
            t = u / width[:, None]
            a = tl.exp(-0.5 * (t * t))
        else:
            a = tl.maximum(width[:, None] - tl.abs(u), 0.0)
        a = tl.where(k_ok[:, None] & (grid < L)[None, :], a, 0.0)
        return raw, width, u, a

    @triton.jit
    def _window(r0, nr, c0, nc, BL0: tl.constexpr, BL1: tl.constexpr):
        # offsets in a channel's (nr, nc) window of the full-grid tile, and which are in it
        i = tl.arange(0, BL0)
        j = tl.arange(0, BL1)
        inside = ((i >= r0) & (i < r0 + nr))[:, None] & ((j >= c0) & (j < c0 + nc))[None, :]
        return (i - r0)[:, None] * nc + (j - c0)[None, :], inside

    @triton.jit
    def _separable_forward(w_ptr, p_ptr, s_ptr, out_ptr, n, K, L0, L1, r0, nr, c0, nc,
                           OFFSET, CUT, NORM_EPS, GAUSSIAN: tl.constexpr, BK: tl.constexpr,
                           BL0: tl.constexpr, BL1: tl.constexpr):
        # one program per channel b: w (B, K), p and s (2, B, K) with n = B * K
        b = tl.program_id(0)
        k = tl.arange(0, BK)
        k_ok = k < K
        e = b * K + k
        _, _, _, a0 = _profiles(p_ptr, s_ptr, e, k_ok, L0, OFFSET, GAUSSIAN, BL0)
        _, _, _, a1 = _profiles(p_ptr + n, s_ptr + n, e, k_ok, L1, OFFSET, GAUSSIAN, BL1)
        w = tl.load(w_ptr + e, mask=k_ok, other=0.0)
        scale = w / (tl.sum(a0, 1) * tl.sum(a1, 1) + NORM_EPS)
        # the K-sum as PyTorch's einsum orders it: (scale * a0)^T @ a1, in float32 (no TF32)
        kern = tl.dot(tl.trans(scale[:, None] * a0), a1, input_precision='ieee')
        if GAUSSIAN:  # GAUSSIAN_CUT, relative to a bound on the channel's largest tap
            bound = tl.sum(tl.abs(scale) * tl.max(a0, 1) * tl.max(a1, 1), 0)
            kern = tl.where(tl.abs(kern) < tl.maximum(bound * CUT, 1.1754943508222875e-38),
                            0.0, kern)
        offs, inside = _window(r0, nr, c0, nc, BL0, BL1)
        tl.store(out_ptr + b.to(tl.int64) * nr * nc + offs, kern, mask=inside)

    @triton.jit
    def _profile_backward(da, raw, width, u, a, GAUSSIAN: tl.constexpr):
        # gradients wrt the position and the raw SIG from da = dL/da[k, i]
        if GAUSSIAN:  # a = exp(-t^2 / 2), t = u / w: da/dpos = a t / w, da/dw = a t u / w^2
            g = da * a * (u / width[:, None]) / width[:, None]
            dpos = tl.sum(g, 1)
            dwidth = tl.sum(g * u / width[:, None], 1)
        else:  # a = relu(w - |u|): da/dpos = sign(u), da/dw = 1 where a > 0
            g = tl.where(a > 0.0, da, 0.0)
            dpos = tl.sum(tl.where(u > 0.0, g, tl.where(u < 0.0, -g, 0.0)), 1)
            dwidth = tl.sum(g, 1)
        # d|SIG|/dSIG = sign(SIG), 0 at 0 (torch.abs)
        return dpos, tl.where(raw > 0.0, dwidth, tl.where(raw < 0.0, -dwidth, 0.0))

    @triton.jit
    def _separable_backward(g_ptr, o_ptr, w_ptr, p_ptr, s_ptr, dw_ptr, dp_ptr, ds_ptr, n, K,
                            L0, L1, r0, nr, c0, nc, OFFSET, NORM_EPS, GAUSSIAN: tl.constexpr,
                            BK: tl.constexpr, BL0: tl.constexpr, BL1: tl.constexpr):
        b = tl.program_id(0)
        k = tl.arange(0, BK)
        k_ok = k < K
        e = b * K + k
        raw0, width0, u0, a0 = _profiles(p_ptr, s_ptr, e, k_ok, L0, OFFSET, GAUSSIAN, BL0)
        raw1, width1, u1, a1 = _profiles(p_ptr + n, s_ptr + n, e, k_ok, L1, OFFSET, GAUSSIAN,
                                         BL1)
        w = tl.load(w_ptr + e, mask=k_ok, other=0.0)
        s0 = tl.sum(a0, 1)
        s1 = tl.sum(a1, 1)
        den = s0 * s1 + NORM_EPS
        scale = w / den
        offs, inside = _window(r0, nr, c0, nc, BL0, BL1)
        base = b.to(tl.int64) * nr * nc
        g = tl.load(g_ptr + base + offs, mask=inside, other=0.0)
        if GAUSSIAN:  # a cut tap (0 in the forward's kernel) passes no gradient
            g = tl.where(tl.load(o_ptr + base + offs, mask=inside, other=0.0) == 0.0, 0.0, g)
        m0 = tl.dot(a1, tl.trans(g), input_precision='ieee')  # m0[k, i] = sum_j a1[k, j] g[i, j]
        m1 = tl.dot(a0, g, input_precision='ieee')            # m1[k, j] = sum_i a0[k, i] g[i, j]
        dscale = tl.sum(a0 * m0, 1)
        # scale = w / (S0 S1 + eps), and S_d sums its profile: dS_d reaches every tap
        ds0 = -dscale * scale * s1 / den
        ds1 = -dscale * scale * s0 / den
        dpos0, dsig0 = _profile_backward(scale[:, None] * m0 + ds0[:, None], raw0, width0, u0,
                                         a0, GAUSSIAN)
        dpos1, dsig1 = _profile_backward(scale[:, None] * m1 + ds1[:, None], raw1, width1, u1,
                                         a1, GAUSSIAN)
        tl.store(dw_ptr + e, dscale / den, mask=k_ok)
        tl.store(dp_ptr + e, dpos0, mask=k_ok)
        tl.store(dp_ptr + n + e, dpos1, mask=k_ok)
        tl.store(ds_ptr + e, dsig0, mask=k_ok)
        tl.store(ds_ptr + n + e, dsig1, mask=k_ok)


BLOCK = 256


def available(P: Tensor) -> bool:
    """Whether the Triton construction can build a kernel from positions ``P`` (float32,
    on a GPU Triton supports, or on the CPU under ``TRITON_INTERPRET=1``)."""
    return P.dtype == torch.float32 and triton_conv.available(P.device, P.dtype)


def bilinear_kernel(weight: Tensor, P: Tensor, L0: int, L1: int, r0: int, nr: int, c0: int,
                    nc: int) -> Tensor:
    """Window ``[r0, r0 + nr) x [c0, c0 + nc)`` of the bilinear kernels of ``weight``
    ``(B, K)`` at positions ``P`` ``(2, B, K)`` (centred), as ``(B, nr, nc)`` float32."""
    w, p = weight.float().contiguous(), P.float().contiguous()
    out = torch.zeros(w.shape[0], nr, nc, device=w.device, dtype=torch.float32)
    n = w.numel()
    with triton_conv.on_device(w):
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
    with triton_conv.on_device(w):
        _bilinear_backward[(triton.cdiv(n, BLOCK),)](g, w, p, dw, dp, n, w.shape[1], L0, L1, r0,
                                                     nr, c0, nc, BLOCK=BLOCK)
    return dw, dp


def _tile(size: int) -> int:
    # tl.dot takes tiles of at least 16 along each dim
    return max(16, triton.next_power_of_2(size))


def _separable_args(weight: Tensor, P: Tensor, SIG: Tensor, L0: int, L1: int,
                    interpolation: str):
    from .kernel import NORM_EPS, SIGMA_OFFSET  # kernel.py imports this module
    K = weight.shape[1]
    return dict(OFFSET=SIGMA_OFFSET[interpolation], NORM_EPS=NORM_EPS,
                GAUSSIAN=interpolation == 'gaussian', BK=_tile(K), BL0=_tile(L0),
                BL1=_tile(L1))


def separable_kernel(weight: Tensor, P: Tensor, SIG: Tensor, L0: int, L1: int,
                     interpolation: str, r0: int, nr: int, c0: int, nc: int) -> Tensor:
    """Window ``[r0, r0 + nr) x [c0, c0 + nc)`` of the triangle or gaussian kernels of
    ``weight`` ``(B, K)`` with positions ``P`` and widths ``SIG`` ``(2, B, K)``, as
    ``(B, nr, nc)`` float32: :func:`dcls_mm.ops.kernel._separable_kernel_torch` with
    one program per channel."""
    from .kernel import GAUSSIAN_CUT
    w, p, sig = (t.float().contiguous() for t in (weight, P, SIG))
    out = torch.empty(w.shape[0], nr, nc, device=w.device, dtype=torch.float32)
    with triton_conv.on_device(w):
        _separable_forward[(w.shape[0],)](
            w, p, sig, out, w.numel(), w.shape[1], L0, L1, r0, nr, c0, nc,
            CUT=GAUSSIAN_CUT * torch.finfo(torch.float32).eps,
            **_separable_args(w, p, sig, L0, L1, interpolation))
    return out


def separable_kernel_backward(grad: Tensor, weight: Tensor, P: Tensor, SIG: Tensor, L0: int,
                              L1: int, interpolation: str, r0: int, nr: int, c0: int, nc: int,
                              out: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients wrt ``weight``, ``P`` and ``SIG`` of :func:`separable_kernel` for the
    window's gradient ``grad`` ``(B, nr, nc)``; ``out`` is the forward's kernel (a
    gaussian tap cut to 0 there passes no gradient)."""
    g, o, w, p, sig = (t.float().contiguous() for t in (grad, out, weight, P, SIG))
    dw, dp, dsig = torch.empty_like(w), torch.empty_like(p), torch.empty_like(sig)
    with triton_conv.on_device(w):
        _separable_backward[(w.shape[0],)](
            g, o, w, p, sig, dw, dp, dsig, w.numel(), w.shape[1], L0, L1, r0, nr, c0, nc,
            **_separable_args(w, p, sig, L0, L1, interpolation))
    return dw, dp, dsig
