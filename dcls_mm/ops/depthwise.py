"""Fast depthwise convolution with large kernels on the CPU (and any device).

ConvNeXt-dcls spends its time in depthwise convolutions with a large dilated kernel
(17x17). PyTorch's CPU kernels for that case are very slow in NCHW, and their weight
gradient is slow in every layout (tens of times the 7x7 cost). This module computes the
same convolution exactly, with three cheaper pieces:

- forward: ``F.conv2d`` on a channels_last input (oneDNN's fast depthwise path; cuDNN
  on GPUs), the compiled direct sum over the taps (CPU), the compiled sum over each
  channel's non-zero taps (CPU; trained DCLS kernels are mostly zeros) or a Triton
  kernel (GPU, :mod:`dcls_mm.ops.triton_conv`), whichever was measured faster for the
  shape and the kernel's share of non-zero taps (not a candidate: ``torch.fft``, which
  took 2.7-6.4x the sparse route's time at the ConvNeXt shapes, 17x17 and 23x23, on a
  2-core AVX-512 CPU, nor oneDNN's blocked ``nChw16c`` layout, whose depthwise
  convolution with 17x17 and 23x23 kernels took 20-42x its channels_last time);
- input gradient: for stride 1 the same forward with the flipped kernel, else
  ``F.conv_transpose2d`` with the same kernel, also channels_last;
- kernel gradient: a cross-correlation of the (padded) input with the output gradient,
  summed over the batch, exactly by a direct sum over the taps that meet the input
  (compiled C++, :mod:`dcls_mm.ops.extension`; usually wins on small maps), real FFTs
  of a 2-3-5-smooth size (cost independent of the kernel size; wins on large maps and
  kernels, on GPUs, and the fallback when the C++ kernels are not built), or on GPUs
  PyTorch's own weight gradient; when the caller says which taps' gradient it reads
  (``grad_support``: a DCLS layer's construction), also a compiled sum over those taps
  only. Which one is faster depends on the machine, so it is measured once per shape
  (:mod:`dcls_mm.ops.routes`).

Before any of this the kernel is cropped to the rows/columns that can touch the input
(for a 7x7 feature map only 13 of 17 rows can): exact, and it saves work in the last
ConvNeXt stage.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from . import extension, routes, triton_conv
from .triton_conv import no_tf32 as _no_tf32
from .double_backward import formula_gradients

def _smooth_size(n: int) -> int:
    """Smallest integer >= n whose prime factors are 2, 3 and 5 (fast FFT sizes)."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def _used_range(size: int, kernel: int, pad_before: int, stride: int, out: int) -> Tuple[int, int]:
    """Kernel taps ``[lo, hi)`` along one dim that meet at least one input sample; when
    none does (every window lies in the padding: the output is the bias), the last tap,
    so that the crop keeps one."""
    lo = min(max(0, pad_before - stride * (out - 1)), kernel - 1)
    hi = min(kernel, pad_before + size)
    return lo, max(hi, lo + 1)


def _fft_shape(x_hw: Tuple[int, int], out_hw: Tuple[int, int],
               padding: Tuple[Tuple[int, int], Tuple[int, int]],
               stride: Tuple[int, int]) -> Tuple[int, int]:
    """Size of the circular correlation that equals the linear one on the kernel's lags."""
    return tuple(_smooth_size(max(size + max(pads), s * (out - 1) + 2))
                 for size, out, pads, s in zip(x_hw, out_hw, padding, stride))


def _kernel_grad_fft(x: Tensor, grad_out: Tensor, kernel_hw: Tuple[int, int],
                     padding: Tuple[Tuple[int, int], Tuple[int, int]],
                     stride: Tuple[int, int]) -> Tensor:
    """dL/dK[c, 0, i, j] = sum_{n,y,x} g[n,c,y,x] * x_pad[n,c,s*y+i,s*x+j].

    A circular cross-correlation of size ``F >= H + max(top, bottom)`` (2-3-5-smooth)
    equals the linear one on the lags the kernel needs, so the input is never padded
    (negative lags wrap to the end of the circle). Computed in float32 (float64 for
    float64 inputs).
    """
    (pt, _), (pl, _) = padding
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(dtype).contiguous()
    g = grad_out.to(dtype).contiguous()
    if stride != (1, 1):
        # strided correlation = dense correlation with a zero-upsampled gradient
        n, c, ho, wo = g.shape
        up = g.new_zeros(n, c, stride[0] * (ho - 1) + 1, stride[1] * (wo - 1) + 1)
        up[:, :, ::stride[0], ::stride[1]] = g
        g = up
    size = _fft_shape(tuple(x.shape[-2:]), tuple(grad_out.shape[-2:]), padding, stride)
    # product summed over the batch, in place: an einsum makes it a batched product of
    # one-column matrices (a slow matrix-vector kernel on GPUs)
    spec = torch.fft.rfft2(x, s=size).mul_(torch.fft.rfft2(g, s=size).conj()).sum(0)
    corr = torch.fft.irfft2(spec, s=size)
    rows = (torch.arange(kernel_hw[0], device=x.device) - pt) % size[0]
    cols = (torch.arange(kernel_hw[1], device=x.device) - pl) % size[1]
    return corr.index_select(1, rows).index_select(2, cols).unsqueeze(1)


def _kernel_grad_aten(x: Tensor, grad_out: Tensor, kernel_hw: Tuple[int, int],
                      padding: Tuple[Tuple[int, int], Tuple[int, int]],
                      stride: Tuple[int, int]) -> Tensor:
    """The same kernel gradient by PyTorch's own convolution weight gradient (cuDNN on
    NVIDIA GPUs), in float32 (float64 for float64 inputs) without TF32, so that it
    rounds like the other routes."""
    (pt, pb), (pl, pr) = padding
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, g = x.to(dtype), grad_out.to(dtype)
    if pt != pb or pl != pr:
        x, pad = F.pad(x, (pl, pr, pt, pb)), (0, 0)
    else:
        pad = (pt, pl)
    with _full_float32(x):
        return torch.nn.grad.conv2d_weight(x, (x.shape[1], 1, *kernel_hw), g, stride, pad,
                                           groups=x.shape[1])


def _kernel_grad(x: Tensor, grad_out: Tensor, kernel: Tensor,
                 padding: Tuple[Tuple[int, int], Tuple[int, int]],
                 stride: Tuple[int, int], support: Optional[Callable[[], Tensor]] = None,
                 density: Optional[float] = None) -> Tensor:
    """Kernel gradient ``(C, 1, kh, kw)`` (float32, float64 for float64 inputs) of a
    convolution with ``kernel``, by FFT, by the direct C++ sum (CPU), by the C++ sum over
    the taps of ``support()`` only (CPU, stride 1, float32; 0 elsewhere) or by PyTorch's
    convolution weight gradient (other devices), whichever was measured faster for this
    shape on this machine (route ``kernel_grad``, see :mod:`dcls_mm.ops.routes`; with a
    support, the kernel's share of non-zero taps, ``density`` if known, is part of the
    shape)."""
    (pt, pb), (pl, pr) = padding
    kernel_hw = tuple(kernel.shape[-2:])
    candidates = {'fft': lambda: _kernel_grad_fft(x, grad_out, kernel_hw, padding, stride)}
    key_density = None
    if x.device.type == 'cpu':
        if x.dtype != torch.float64 and extension.available():
            candidates['direct'] = lambda: torch.ops.dcls_mm.depthwise_kernel_grad(
                x.float(), grad_out.float(), kernel_hw[0], kernel_hw[1], pt, pl, *stride)
        if support is not None and _sparse_grad_available(stride, padding, x.dtype, x.device):
            # support() is called only when this candidate runs (it costs up to ~0.5 ms)
            candidates['sparse'] = lambda: torch.ops.dcls_mm.sparse_depthwise_kernel_grad(
                x, grad_out.float(), support(), pt, pb, pl, pr)
            key_density = _density(kernel) if density is None else density
    else:
        # not a CPU candidate: PyTorch's CPU depthwise weight gradient with a large kernel
        # takes tens of times the others, and measuring it would cost seconds per shape
        candidates['aten'] = lambda: _kernel_grad_aten(x, grad_out, kernel_hw, padding, stride)
    return routes.run('kernel_grad', kernel_grad_key(x.shape, grad_out.shape, kernel_hw,
                                                     padding, stride, x.dtype, key_density),
                      candidates, x.device)


def _sparse_grad_available(stride: Sequence[int], padding: Sequence[Sequence[int]],
                           dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the ``sparse`` kernel-gradient route can run a call (given a support)."""
    return (device.type == 'cpu' and dtype == torch.float32 and tuple(stride) == (1, 1)
            and min(p for pair in padding for p in pair) >= 0 and extension.available()
            and not tracing())


def kernel_grad_key(x_shape: Sequence[int], out_shape: Sequence[int], kernel_hw: Sequence[int],
                    padding: Sequence[Sequence[int]], stride: Sequence[int],
                    dtype: torch.dtype, density: Optional[float] = None) -> str:
    """Route-cache key of one kernel-gradient shape (what its speed depends on).

    Args:
        x_shape: input ``(N, C, H, W)``.
        out_shape: output ``(N, C, H_out, W_out)``.
        kernel_hw: (cropped) kernel ``(kh, kw)``.
        padding: ``((top, bottom), (left, right))`` after cropping.
        stride: ``(sh, sw)``.
        dtype: input dtype.
        density: the kernel's share of non-zero taps, when the ``sparse`` route is a
            candidate (rounded to 10% steps; the taps it visits, the construction's
            support, are about those of a trained DCLS kernel).
    """
    n, c, h, w = x_shape
    key = (f'N{n} C{c} in{h}x{w} out{out_shape[-2]}x{out_shape[-1]} k{kernel_hw[0]}x{kernel_hw[1]} '
           f'pad{tuple(map(tuple, padding))} s{tuple(stride)} {str(dtype).replace("torch.", "")}')
    return key if density is None else f'{key} nz{density_step(density)}%'


def tracing() -> bool:
    """Whether this call is being traced into a graph rather than run: dynamo
    (``torch.compile``, ``torch.export``), ``torch.jit.trace``, or a dispatch mode such as
    ``make_fx``'s proxy mode or fake tensors (AOT autograd)."""
    return (torch.compiler.is_compiling() or torch.jit.is_tracing()
            or is_in_torch_dispatch_mode())


def _full_float32(t: Tensor):
    """Context for PyTorch's convolutions on ``t``: cuDNN without TF32 for float32 CUDA
    tensors (the precision of the other routes, so that a route's choice does not change
    float32 results), nothing elsewhere."""
    return _no_tf32() if t.is_cuda and t.dtype == torch.float32 else contextlib.nullcontext()


def _conv_channels_last(x: Tensor, kernel: Tensor, bias: Optional[Tensor],
                        stride: Tuple[int, int],
                        padding: Tuple[Tuple[int, int], Tuple[int, int]]) -> Tensor:
    """Forward depthwise conv on a channels_last copy of ``x`` by ``F.conv2d`` (oneDNN;
    cuDNN on NVIDIA GPUs, in float32 without TF32 like the other routes, so that the
    measured choice does not change float32 results; differentiable, any dtype; the bias
    added by the convolution itself: a separate ``y + bias`` is one more pass over the
    output)."""
    (pt, pb), (pl, pr) = padding
    xc = x.contiguous(memory_format=torch.channels_last)
    k = kernel.to(x.dtype)
    b = None if bias is None else bias.to(x.dtype)
    if pt != pb or pl != pr:
        xc, pad = F.pad(xc, (pl, pr, pt, pb)), (0, 0)
    else:
        pad = (pt, pl)
    with _full_float32(x):
        return F.conv2d(xc, k, b, stride, pad, 1, x.shape[1])


def conv_key(x_shape: Sequence[int], kernel_hw: Sequence[int],
             padding: Sequence[Sequence[int]], dtype: torch.dtype = torch.float32,
             density: Optional[float] = None) -> str:
    """Route-cache key of one stride-1 forward shape (route ``conv``).

    Args:
        x_shape: input ``(N, C, H, W)``.
        kernel_hw: (cropped) kernel ``(kh, kw)``.
        padding: ``((top, bottom), (left, right))`` after cropping.
        dtype: input dtype.
        density: fraction of the kernel's taps that are not zero, when the ``sparse``
            route is a candidate (its speed depends on it; rounded to 10% steps).
    """
    n, c, h, w = x_shape
    key = (f'N{n} C{c} in{h}x{w} k{kernel_hw[0]}x{kernel_hw[1]} '
           f'pad{tuple(map(tuple, padding))} {str(dtype).replace("torch.", "")}')
    return key if density is None else f'{key} nz{density_step(density)}%'


def _density(kernel: Tensor) -> float:
    """Share of the (float32 CPU) kernel's taps that are not zero."""
    return torch.ops.dcls_mm.nonzero_count(kernel.detach()) / kernel.numel()


def density_step(density: float) -> int:
    """``density`` (fraction of non-zero taps) rounded to the route key's 10% steps
    (halves up)."""
    return int(math.floor(10 * float(density) + 0.5)) * 10


def _conv_routes(channels: int, stride: Sequence[int], padding: Sequence[Sequence[int]],
                 dtype: torch.dtype, device: torch.device) -> Tuple[str, ...]:
    """Forward routes available for a call, PyTorch's own convolution first: ``onednn``
    (CPU) or ``aten`` (other devices: cuDNN on NVIDIA GPUs); ``direct``, the compiled sum
    (CPU, stride 1, float32, channels in blocks of 16, no negative padding); ``sparse``,
    the compiled sum over each channel's non-zero taps (CPU, stride 1, float32, no
    negative padding); ``triton`` (GPU, stride 1, :mod:`dcls_mm.ops.triton_conv`)."""
    stride1 = tuple(stride) == (1, 1)
    names = ['onednn' if device.type == 'cpu' else 'aten']
    compiled = (device.type == 'cpu' and stride1 and dtype == torch.float32
                and min(p for pair in padding for p in pair) >= 0 and extension.available())
    if compiled and channels % 16 == 0:
        names.append('direct')
    if compiled:
        names.append('sparse')
    if stride1 and triton_conv.available(device, dtype):
        names.append('triton')
    return tuple(names)


#: a forward depthwise conv by one route with everything but the input and the bias bound
ConvFn = Callable[[Tensor, Optional[Tensor]], Tensor]


def _route_fns(names: Sequence[str], kernel: Tensor, stride: Tuple[int, int],
               padding: Tuple[Tuple[int, int], Tuple[int, int]]) -> Dict[str, ConvFn]:
    """The forward routes ``names`` (:func:`_conv_routes`) as functions of (x, bias)."""
    (pt, pb), (pl, pr) = padding

    def channels_last(x, b):
        return _conv_channels_last(x, kernel, b, stride, padding)
    fns = {
        'onednn': channels_last,
        'aten': channels_last,
        'direct': lambda x, b: torch.ops.dcls_mm.depthwise_conv(x, kernel, b, pt, pb, pl, pr),
        'sparse': lambda x, b: torch.ops.dcls_mm.sparse_depthwise_conv(x, kernel, b, pt, pb, pl,
                                                                       pr),
        'triton': lambda x, b: triton_conv.depthwise_conv(x, kernel, b, padding)}
    return {name: fns[name] for name in names}


def _conv_route(x: Tensor, kernel: Tensor, bias: Optional[Tensor], stride: Tuple[int, int],
                padding: Tuple[Tuple[int, int], Tuple[int, int]],
                density: Optional[float] = None) -> Tuple[ConvFn, Tensor]:
    """:func:`_conv`'s route, as a function of (x, bias), and its result."""
    names = _conv_routes(x.shape[1], stride, padding, x.dtype, x.device)
    # a traced graph takes PyTorch's own convolution (the density below is a value the
    # graph could not branch on)
    if tracing() or ('sparse' in names and (
            kernel.dtype != torch.float32 or (bias is not None and bias.dtype != torch.float32))):
        names = names[:1]
    fns = _route_fns(names, kernel, stride, padding)
    if len(names) == 1:
        return fns[names[0]], fns[names[0]](x, bias)
    # the sparse route's speed depends on how many taps are zero (trained DCLS kernels:
    # most of them), so the density is part of its shape
    if 'sparse' not in names:
        density = None
    elif density is None:
        density = _density(kernel)
    route, y = routes.choose(
        'conv', conv_key(x.shape, kernel.shape[-2:], padding, x.dtype, density),
        {name: functools.partial(fn, x, bias) for name, fn in fns.items()}, x.device)
    return fns[route], y


def _conv(x: Tensor, kernel: Tensor, bias: Optional[Tensor], stride: Tuple[int, int],
          padding: Tuple[Tuple[int, int], Tuple[int, int]],
          density: Optional[float] = None) -> Tensor:
    """Forward depthwise conv (no autograd), channels_last output, by whichever of the
    available routes (:func:`_conv_routes`) was measured fastest for this shape on this
    machine (route ``conv``; AVX2 and AVX-512 CPUs, and GPUs, choose differently).
    ``density``: the kernel's share of non-zero taps if the caller knows it."""
    return _conv_route(x, kernel, bias, stride, padding, density)[1]


class _DepthwiseConv2d(torch.autograd.Function):
    """Depthwise conv (groups = channels, multiplier 1) with explicit, fast gradients."""

    @staticmethod
    def forward(ctx, x: Tensor, kernel: Tensor, bias: Optional[Tensor], stride: Tuple[int, int],
                padding: Tuple[Tuple[int, int], Tuple[int, int]],
                grad_support: Optional[Callable[[], Tensor]]) -> Tensor:
        # the kernel's share of non-zero taps, counted once for the forward, the input
        # gradient (the same taps, flipped) and the kernel gradient's route keys
        density = (_density(kernel) if kernel.dtype == torch.float32 and not tracing()
                   and 'sparse' in _conv_routes(x.shape[1], stride, padding, x.dtype, x.device)
                   else None)
        y = _conv(x, kernel, bias, stride, padding, density)
        # x itself, not its channels_last copy: a copy made here is not in the autograd
        # graph, so higher-order gradients could not reach x through it
        ctx.save_for_backward(x, kernel, bias)
        ctx.stride, ctx.padding, ctx.grad_support = stride, padding, grad_support
        ctx.density = density
        return y

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, kernel, bias = ctx.saved_tensors
        stride, padding = ctx.stride, ctx.padding
        if torch.is_grad_enabled():
            # backward(create_graph=True): the C++ kernel gradient has no derivative, so
            # take the gradients of the same convolution through PyTorch's own
            # (twice differentiable) ops instead
            y = _conv_channels_last(x, kernel, bias, stride, padding)
            return (*formula_gradients(y, (x, kernel, bias), ctx.needs_input_grad[:3],
                                       grad_out), None, None, None)
        x = x.contiguous(memory_format=torch.channels_last)
        (pt, pb), (pl, pr) = padding
        g = grad_out.contiguous(memory_format=torch.channels_last)
        grad_x = grad_k = grad_b = None
        kh, kw = kernel.shape[-2:]
        if (ctx.needs_input_grad[0] and stride == (1, 1) and pt == pb and pl == pr
                and pt <= kh - 1 and pl <= kw - 1):
            # stride 1: the input gradient is a correlation with the flipped kernel
            grad_x = _conv(g, kernel.flip(-2, -1).to(g.dtype), None, (1, 1),
                           ((kh - 1 - pt, kh - 1 - pt), (kw - 1 - pl, kw - 1 - pl)),
                           ctx.density if g.dtype == torch.float32 else None)
        elif ctx.needs_input_grad[0]:
            h, w = x.shape[-2:]
            # rows/cols of the padded input that the strided windows reach
            used_h = stride[0] * (g.shape[-2] - 1) + kh
            used_w = stride[1] * (g.shape[-1] - 1) + kw
            with _full_float32(g):
                gx = F.conv_transpose2d(g, kernel.to(g.dtype), None, stride, 0, 0, x.shape[1])
            # (a negative pb/pr means trailing input rows/cols that no window reaches)
            full = gx.new_zeros(*gx.shape[:2], pt + h + max(pb, 0), pl + w + max(pr, 0))
            full = full.contiguous(memory_format=torch.channels_last)
            full[:, :, :used_h, :used_w] = gx
            grad_x = full[:, :, pt:pt + h, pl:pl + w]
        if ctx.needs_input_grad[1]:
            grad_k = _kernel_grad(x, g, kernel, padding, stride, ctx.grad_support, ctx.density)
            grad_k = grad_k.to(kernel.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = g.sum((0, 2, 3), dtype=torch.float64 if g.dtype == torch.float64
                           else torch.float32).to(bias.dtype)
        return grad_x, grad_k, grad_b, None, None, None


def used_taps(x_hw: Sequence[int], kernel_hw: Sequence[int], stride: Sequence[int],
              padding: Sequence[Sequence[int]]):
    """Kernel rows/columns that ever meet the input, and the padding that goes with them.

    Cropping the kernel to them is exact for zero padding: the other taps only ever
    multiply padding zeros (a 17x17 kernel on a 7x7 map with padding 8 meets 13x13 taps).

    Args:
        x_hw: input ``(H, W)``.
        kernel_hw: kernel ``(kh, kw)``.
        stride: ``(sh, sw)``.
        padding: ``((top, bottom), (left, right))`` zero padding.

    Returns:
        ``((r0, r1, c0, c1), ((top, bottom), (left, right)))``: the used rows ``[r0, r1)``
        and columns ``[c0, c1)``, and the padding for the cropped kernel (same output).
    """
    x_hw, kernel_hw, stride = tuple(x_hw), tuple(kernel_hw), tuple(stride)
    (pt, pb), (pl, pr) = padding
    (h, w), (kh, kw) = x_hw, kernel_hw
    out_h = (h + pt + pb - kh) // stride[0] + 1
    out_w = (w + pl + pr - kw) // stride[1] + 1
    r0, r1 = _used_range(h, kh, pt, stride[0], out_h)
    c0, c1 = _used_range(w, kw, pl, stride[1], out_w)
    if (r0, r1, c0, c1) != (0, kh, 0, kw):
        pt, pl = pt - r0, pl - c0
        pb = (out_h - 1) * stride[0] + (r1 - r0) - h - pt
        pr = (out_w - 1) * stride[1] + (c1 - c0) - w - pl
    return (r0, r1, c0, c1), ((pt, pb), (pl, pr))


def kernel_grad_route(x_shape: Sequence[int], kernel_hw: Sequence[int], stride: Sequence[int],
                      padding: Sequence[Sequence[int]], dtype: torch.dtype = torch.float32,
                      device: torch.device = torch.device('cpu'),
                      density: Optional[float] = None) -> str:
    """Kernel-gradient route this process uses for a :func:`depthwise_conv2d` call (for
    reports): ``'direct'``, ``'fft'``, ``'sparse'``, ``'aten'`` (GPUs), ``'... (forced)'``,
    ``'... (only one available)'`` or ``'not measured yet'``.

    Args:
        x_shape: input ``(N, C, H, W)``.
        kernel_hw: kernel ``(kh, kw)`` before cropping.
        stride: ``(sh, sw)``.
        padding: ``((top, bottom), (left, right))``.
        dtype: input dtype.
        device: where it ran.
        density: the (cropped) kernel's share of non-zero taps when the call had a
            ``grad_support``; ``None``: it had none.
    """
    stride = tuple(stride)
    (r0, r1, c0, c1), padding = used_taps(tuple(x_shape[-2:]), tuple(kernel_hw), stride, padding)
    (pt, pb), (pl, pr) = padding
    out_hw = ((x_shape[-2] + pt + pb - (r1 - r0)) // stride[0] + 1,
              (x_shape[-1] + pl + pr - (c1 - c0)) // stride[1] + 1)
    if not _sparse_grad_available(stride, padding, dtype, torch.device(device)):
        density = None
    key = kernel_grad_key(x_shape, (*x_shape[:2], *out_hw), (r1 - r0, c1 - c0), padding, stride,
                          dtype, density)
    return routes.chosen('kernel_grad', key, device) or 'not measured yet'


def conv_route(x_shape: Sequence[int], kernel_hw: Sequence[int], stride: Sequence[int],
               padding: Sequence[Sequence[int]], dtype: torch.dtype = torch.float32,
               device: torch.device = torch.device('cpu'), density: float = 1.0) -> str:
    """Forward route this process uses for a :func:`depthwise_conv2d` call (for reports):
    a route of :func:`_conv_routes`, ``'... (forced)'``, ``'... (only one available)'`` or
    ``'not measured yet'``. Same arguments as :func:`kernel_grad_route`, the device, and
    the fraction of the (cropped) kernel's taps that are not zero."""
    stride = tuple(stride)
    (r0, r1, c0, c1), padding = used_taps(tuple(x_shape[-2:]), tuple(kernel_hw), stride, padding)
    names = _conv_routes(x_shape[1], stride, padding, dtype, torch.device(device))
    if len(names) == 1:
        return f'{names[0]} (only one available)'
    key = conv_key(x_shape, (r1 - r0, c1 - c0), padding, dtype,
                   density if 'sparse' in names else None)
    return routes.chosen('conv', key, device) or 'not measured yet'


def _cut_leading(x: Tensor, padding: Sequence[Sequence[int]]
                 ) -> Tuple[Tensor, Tuple[Tuple[int, int], Tuple[int, int]]]:
    """Negative top/left padding (which, as in ``F.pad``, drops leading rows/columns) as
    a slice of ``x``: the routes and gradients take padding >= 0 there."""
    (pt, pb), (pl, pr) = padding
    if pt < 0 or pl < 0:
        x = x[:, :, max(-pt, 0):, max(-pl, 0):]
    return x, ((max(pt, 0), pb), (max(pl, 0), pr))


def _crop_to_used_taps(x: Tensor, kernel: Tensor, stride: Tuple[int, int],
                       padding: Sequence[Sequence[int]]
                       ) -> Tuple[Tensor, Tuple[int, int, int, int],
                                  Tuple[Tuple[int, int], Tuple[int, int]]]:
    """``kernel`` cropped to the taps that ``x`` meets, those taps ``(r0, r1, c0, c1)`` and
    the padding that goes with the crop (:func:`used_taps`)."""
    taps, padding = used_taps(tuple(x.shape[-2:]), tuple(kernel.shape[-2:]), stride, padding)
    r0, r1, c0, c1 = taps
    if taps != (0, kernel.shape[-2], 0, kernel.shape[-1]):
        kernel = kernel[:, :, r0:r1, c0:c1]
    return kernel, taps, padding


def depthwise_conv2d(x: Tensor, kernel: Tensor, stride: Sequence[int] = (1, 1),
                     padding: Sequence[Sequence[int]] = ((0, 0), (0, 0)),
                     bias: Optional[Tensor] = None,
                     grad_support: Optional[Callable[[], Tensor]] = None) -> Tensor:
    """Exact depthwise 2-D convolution (zero padding), fast for large kernels.

    Args:
        x: input ``(N, C, H, W)``, any memory format, float32/bfloat16/float16/float64.
        kernel: ``(C, 1, kh, kw)``; gradients flow to it and to ``x``.
        stride: ``(sh, sw)``.
        padding: ``((top, bottom), (left, right))`` zero padding.
        bias: optional ``(C,)``, added by the convolution (gradients flow to it).
        grad_support: optional function returning a bool ``(C, 1, kh, kw)``: the taps
            whose kernel gradient the caller reads. The kernel gradient is then exact on
            those taps and may be 0 on the others (the ``sparse`` route computes only
            those; a DCLS layer passes its :func:`dcls_mm.ops.kernel.gradient_support`).
            Called in the backward, only when that route runs. ``None``: every tap.

    Returns:
        ``(N, C, H_out, W_out)`` in channels_last memory format (the layout the next
        ConvNeXt ops want), with the same values as
        ``F.conv2d(F.pad(x, ...), kernel, bias, stride=stride, groups=C)``. Higher-order
        gradients (``backward(create_graph=True)``, e.g. gradient penalties) are exact
        too: that backward goes through PyTorch's own convolution ops (slower).
    """
    stride = tuple(stride)
    full_shape = tuple(kernel.shape)
    x, padding = _cut_leading(x, padding)
    kernel, taps, padding = _crop_to_used_taps(x, kernel, stride, padding)
    if grad_support is not None:
        grad_support = functools.partial(_cropped_support, grad_support, full_shape, taps)
    if not torch.is_grad_enabled() or not any(
            t is not None and t.requires_grad for t in (x, kernel, bias)):
        return _conv(x, kernel, bias, stride, padding)
    return _DepthwiseConv2d.apply(x, kernel, bias, stride, padding, grad_support)


def depthwise_conv2d_plan(x: Tensor, kernel: Tensor, stride: Sequence[int] = (1, 1),
                          padding: Sequence[Sequence[int]] = ((0, 0), (0, 0)),
                          bias: Optional[Tensor] = None) -> Tuple[Tensor, ConvFn]:
    """For inference with a fixed kernel: :func:`depthwise_conv2d` of ``x`` without
    autograd, and a function ``f(x, bias)`` computing it again for inputs of the same
    shape, dtype and device by the same route, without the per-call work (the kernel's
    crop and density, the route's key: ~0.1-0.3 ms a call on a 2-core CPU).

    Args:
        x, kernel, stride, padding, bias: as in :func:`depthwise_conv2d`.

    Returns:
        ``(y, f)``: the output and the function.
    """
    stride = tuple(stride)
    cut, cut_padding = _cut_leading(x, padding)
    kernel, _, cut_padding = _crop_to_used_taps(cut, kernel, stride, cut_padding)
    with torch.no_grad():
        route, y = _conv_route(cut, kernel, bias, stride, cut_padding)
    if cut is x:  # no negative top/left padding
        return y, route
    return y, lambda x, b: route(_cut_leading(x, padding)[0], b)


def _cropped_support(support: Callable[[], Tensor], kernel_shape: Tuple[int, ...],
                     taps: Tuple[int, int, int, int]) -> Tensor:
    """``support()`` checked against the kernel's shape and cropped to the used taps."""
    mask = support()
    if tuple(mask.shape) != kernel_shape or mask.dtype != torch.bool:
        raise ValueError(f'grad_support must return a bool tensor of the kernel\'s shape '
                         f'{kernel_shape}, got {mask.dtype} {tuple(mask.shape)}')
    r0, r1, c0, c1 = taps
    return mask[:, :, r0:r1, c0:c1]
