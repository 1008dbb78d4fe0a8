"""Depthwise forward convolution with a large kernel on GPUs, in Triton.

PyTorch's CUDA depthwise convolution (cuDNN, channels_last, bf16) with a 17x17 kernel
took 7.5x the time of the 7x7 one on an H200 (batch 64, 96 channels at 56x56), far from
what the arithmetic needs. This kernel computes the same sums directly: one program
owns a strip of ``BLOCK_W`` output columns of one output row for ``BLOCK_C`` channels
(channels are contiguous in channels_last memory, so every load is coalesced), keeps
the sums in float32 registers and walks the kernel taps that meet the input. It also
serves the stride-1 input gradient, which is the same correlation with the flipped
kernel (:func:`dcls_mm.ops.depthwise._conv`).

It is one candidate of the measured ``conv`` route (:mod:`dcls_mm.ops.routes`): it runs
only where it was measured faster than PyTorch's convolution for that shape on that GPU.
Without Triton or a GPU nothing here is used. ``TRITON_INTERPRET=1`` runs it on the CPU
(tests).
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Optional, Tuple

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - missing, or an install that fails to import
    triton = None

#: dtypes the kernel reads and writes (sums in float32 whatever the input dtype)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def no_tf32():
    """cuDNN without TF32, its other settings (enabled, benchmark, deterministic) as the
    user set them."""
    cudnn = torch.backends.cudnn
    return cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark,
                       deterministic=cudnn.deterministic, allow_tf32=False)


def on_device(t: Tensor):
    """Context for a launch: Triton launches on the current device, which need not be
    the tensors' one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def interpreted() -> bool:
    """Whether Triton runs kernels on the CPU (``TRITON_INTERPRET=1``, for tests)."""
    return os.environ.get('TRITON_INTERPRET', '0') not in ('', '0')


@functools.lru_cache(maxsize=None)
def _gpu_supported(device: torch.device) -> bool:
    # Triton compiles for NVIDIA GPUs of compute capability 7.0 (Volta) and later, and
    # for the AMD GPUs of ROCm builds
    return torch.version.hip is not None or torch.cuda.get_device_capability(device) >= (7, 0)


def available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether Triton kernels can run for tensors of ``dtype`` on ``device`` (this
    module's: float32, bfloat16, float16).

    Args:
        device: where the tensors are.
        dtype: their dtype.
    """
    if triton is None or dtype not in DTYPES:
        return False
    if device.type == 'cpu':
        return interpreted()
    return device.type == 'cuda' and _gpu_supported(device)


if triton is not None:
    # strip width x channel block: measured per shape on the GPU at first use (what suits
    # a 56- or a 7-column map differs, and so do GPUs); the interpreter cannot time
    # kernels, so it runs the first
    _CONFIGS = [triton.Config({'BLOCK_W': w, 'BLOCK_C': c}, num_warps=4)
                for w, c in ((16, 64), (8, 64), (32, 64), (16, 128), (32, 32), (64, 32))]

    @triton.autotune(configs=_CONFIGS[:1] if interpreted() else _CONFIGS,
                     key=['C', 'W', 'WO', 'KH', 'KW'])
    @triton.jit
    def _depthwise_forward(x_ptr, w_ptr, b_ptr, y_ptr, H, W, C, HO, WO, KH, KW, PT, PL,
                           HAS_BIAS: tl.constexpr, BLOCK_W: tl.constexpr,
                           BLOCK_C: tl.constexpr):
        # x: (N, H, W, C), w: (KH, KW, C), y: (N, HO, WO, C), all contiguous
        pid = tl.program_id(0)
        strips = tl.cdiv(WO, BLOCK_W)
        oh = (pid // strips) % HO
        n = (pid // strips // HO).to(tl.int64)
        ow = (pid % strips) * BLOCK_W + tl.arange(0, BLOCK_W)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < C
        acc = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
        # only the kernel rows whose input row exists
        i0 = tl.maximum(PT - oh, 0)
        i1 = tl.minimum(H + PT - oh, KH)
        for i in range(i0, i1):
            row = x_ptr + (n * H + (oh + i - PT)) * W * C
            for j in range(KW):
                iw = ow + (j - PL)
                m = ((iw >= 0) & (iw < W))[:, None] & c_ok[None, :]
                xv = tl.load(row + iw[:, None] * C + c[None, :], mask=m, other=0.0)
                wv = tl.load(w_ptr + (i * KW + j) * C + c, mask=c_ok, other=0.0)
                acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        out = y_ptr + ((n * HO + oh) * WO + ow[:, None]) * C + c[None, :]
        tl.store(out, acc.to(y_ptr.dtype.element_ty),
                 mask=(ow < WO)[:, None] & c_ok[None, :])


def depthwise_conv(x: Tensor, kernel: Tensor, bias: Optional[Tensor],
                   padding: Tuple[Tuple[int, int], Tuple[int, int]]) -> Tensor:
    """Stride-1 depthwise cross-correlation with zero padding, like ``F.conv2d`` with
    ``groups = C`` (sums in float32, rounded once to ``x.dtype``).

    Args:
        x: ``(N, C, H, W)`` in :data:`DTYPES`, any memory format (made channels_last).
        kernel: ``(C, 1, kh, kw)``, used in ``x.dtype`` (as ``F.conv2d`` would).
        bias: ``(C,)`` or ``None``.
        padding: ``((top, bottom), (left, right))``, any sign.

    Returns:
        ``(N, C, H_out, W_out)`` channels_last, ``x.dtype``.
    """
    n, c, h, w = x.shape
    kh, kw = kernel.shape[-2:]
    (pt, pb), (pl, pr) = padding
    ho, wo = h + pt + pb - kh + 1, w + pl + pr - kw + 1
    if ho < 1 or wo < 1:
        raise ValueError(f'empty output {ho}x{wo} for input {h}x{w}, kernel {kh}x{kw} '
                         f'and padding {padding}')
    x = x.contiguous(memory_format=torch.channels_last)
    taps = kernel.to(x.dtype).reshape(c, kh, kw).permute(1, 2, 0).contiguous()
    y = torch.empty((n, c, ho, wo), device=x.device, dtype=x.dtype,
                    memory_format=torch.channels_last)
    b = taps if bias is None else bias.to(x.dtype).contiguous()

    def grid(meta):
        return (n * ho * triton.cdiv(wo, meta['BLOCK_W']), triton.cdiv(c, meta['BLOCK_C']))
    with on_device(x):
        _depthwise_forward[grid](x, taps, b, y, h, w, c, ho, wo, kh, kw, pt, pl,
                                 HAS_BIAS=bias is not None)
    return y
