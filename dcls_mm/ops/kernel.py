"""Construction of DCLS kernels without (L_0 x L_1 x C x K) temporaries.

Each of the ``kernel_count`` elements of a DCLS kernel is a weight ``w`` at a continuous
position ``p`` (one coordinate per learned dim). The dense kernel is the sum over
elements of ``w`` spread onto the integer grid by an interpolation. Every supported
interpolation is a *product of 1-D profiles*, one per learned dim, and so is its
normalisation, which gives two exact constructions:

- bilinear (the published models): each 1-D profile has two non-zero taps, so an element
  is ``2^D`` weighted taps, scattered (``scatter_add``) into the kernel: memory and work
  ``O(C * K * 2^D)``. That is ~35 small autograd ops, 0.7-2.7 ms per ConvNeXt layer on the
  CPU for microseconds of arithmetic, so for 2 learned dims in float32 a compiled op
  (``csrc/bilinear_kernel.cpp``) adds the same taps in the same order (same bits);
- triangle / gaussian (every grid point non-zero): the kernel is an ``einsum`` of small
  factors, ``K[..., i, j] = sum_k s[..., k] * A_0[..., k, i] * A_1[..., k, j]`` with
  ``A_d`` of shape ``(..., K, L_d)`` and ``s = w / Z``: memory ``O(C * K * sum(L_d))``.
  On the CPU PyTorch runs that ``einsum`` as one tiny GEMM per channel (thousands of
  calls, more time than the convolution), so for 2 learned dims in float32 the compiled
  kernels (:mod:`dcls_mm.ops.extension`, ``csrc/separable_kernel.cpp``) compute the same
  formula, forward and backward, 16 channels per vector; the ``einsum`` stays the
  fallback (route ``construct``: ``compiled`` on the CPU, ``triton`` on GPUs
  (:mod:`dcls_mm.ops.triton_construct`), else ``torch``, or ``scatter`` for bilinear;
  see :func:`construction_route`).

Axis convention (one for every interpolation): ``P[d]`` is the position along the
d-th *learned* kernel dim, in the order of the kernel tensor's trailing dims (for 2-D:
``P[0]`` = height/rows, ``P[1]`` = width/columns), centred: the grid coordinate is
``P[d] + L_d // 2``.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import extension, routes, triton_construct
from .double_backward import formula_gradients

#: Canonical interpolation names and the reference package's names for them (its
#: ``version=`` argument: ``'v0'``, ``'v1'``, ``'max'``, ``'gauss'``).
INTERPOLATIONS = ('bilinear', 'bilinear_normalized', 'triangle', 'gaussian')
INTERPOLATION_ALIASES = {
    'v0': 'bilinear',
    'bilinear': 'bilinear',
    'v1': 'bilinear_normalized',
    'bilinear_normalized': 'bilinear_normalized',
    'max': 'triangle',
    'triangle': 'triangle',
    'gauss': 'gaussian',
    'gaussian': 'gaussian',
}
#: Interpolations with a learnable width ``SIG`` per element and learned dim.
WITH_SIGMA = ('triangle', 'gaussian')
#: Added to ``|SIG|`` to get the profile width (the reference package's constants).
SIGMA_OFFSET = {'triangle': 1.0, 'gaussian': 0.27}
#: Initial ``SIG`` (gaussian: 0.23 + 0.27 = initial width 0.5).
SIGMA_INIT = {'triangle': 0.0, 'gaussian': 0.23}
#: Added to the normalisation sum, as in the reference package.
NORM_EPS = 1e-7
#: Gaussian taps smaller than ``GAUSSIAN_CUT * finfo(dtype).eps`` (float32: 2^-32) times a
#: bound on their channel's largest tap (``sum_k |s_k| prod_d max_i A_d[k, i]``) are set
#: to 0. Far below the dtype's resolution, they change no output by more than its
#: rounding, but in float32 their products with small activations or gradients are
#: subnormal floats, which x86 CPUs multiply ~100x slower: an initial gaussian kernel is
#: ~80% taps of 1e-20..1e-38, and oneDNN's 23x23 convolution with it ran 4-6x slower on
#: inputs of 1e-6..1e-12 (a ConvNeXt's gradients).
GAUSSIAN_CUT = 2.0 ** -9
#: per learned dim, the ``(start, stop)`` taps to build (see :func:`construct_kernel`)
Window = Tuple[Tuple[int, int], ...]


def canonical_interpolation(interpolation: str, arg_name: str = 'interpolation') -> str:
    """Map a reference (``'v0'``, ``'v1'``, ``'max'``, ``'gauss'``) or readable name to
    its canonical name in :data:`INTERPOLATIONS`.

    Args:
        interpolation: any key of :data:`INTERPOLATION_ALIASES`.
        arg_name: the argument name the error message quotes (``'version'`` when a
            caller still uses the reference package's spelling).

    Raises:
        ValueError: for an unknown name.
    """
    try:
        return INTERPOLATION_ALIASES[interpolation]
    except (KeyError, TypeError):
        raise ValueError(f'{arg_name} must be one of {sorted(INTERPOLATION_ALIASES)}, '
                         f'got {interpolation!r}') from None


def profile_1d(pos: Tensor, sig: Tensor, grid: Tensor, interpolation: str) -> Tensor:
    """1-D triangle or gaussian profile of every element along one learned dim.

    Args:
        pos: positions on the grid (already shifted by ``L // 2``), shape ``(..., K)``.
        sig: raw ``SIG`` of the same shape.
        grid: ``arange(L)`` in the dtype of ``pos``, shape ``(L,)``.
        interpolation: ``'triangle'`` or ``'gaussian'``.

    Returns:
        Tensor of shape ``(..., K, L)``.
    """
    u = grid - pos.unsqueeze(-1)
    width = (sig.abs() + SIGMA_OFFSET[interpolation]).unsqueeze(-1)
    if interpolation == 'triangle':
        return torch.relu(width - u.abs())
    if interpolation == 'gaussian':
        return torch.exp(-0.5 * (u / width) ** 2)
    raise ValueError(f'unknown interpolation {interpolation!r}')


@functools.lru_cache(maxsize=64)
def _offsets_tensor(offsets: Tuple[int, ...], device: torch.device) -> Tensor:
    # made once per device: torch.tensor(list, device=gpu) is a blocking host-to-device copy
    return torch.tensor(offsets, device=device)


def _bilinear_kernel(weight: Tensor, P: Tensor, sizes: Sequence[int], normalize: bool) -> Tensor:
    """Scatter the ``2^D`` bilinear taps of every element into the kernel.

    Written with ``floor`` (not ``relu(1 - |u|)``): same values, and at integer positions
    (e.g. clamped to a border) a position keeps a one-sided gradient instead of zero, as
    in the reference "v0" kernels the published checkpoints were trained with.
    Positions are first clamped to ``[-1, L]`` (a tap there has no weight on the grid,
    and neither has anything further out); taps then land in a grid padded with one cell
    before and two after, which is cropped away. At ConvNeXt sizes the cost is the
    number of autograd ops, not their size: the tap weights are products of same-shape
    tensors (no broadcasting, whose backward needs reductions).
    """
    D = len(sizes)
    lead = weight.shape[:-1]
    padded = [L + 3 for L in sizes]
    strides = [1] * D
    for d in range(D - 2, -1, -1):
        strides[d] = strides[d + 1] * padded[d + 1]
    fracs, low, norm = [], 0, None
    for d, L in enumerate(sizes):
        # floor(P + L // 2) = floor(P) + L // 2: the centring stays out of the graph
        pos = P[d].clamp(-1 - L // 2, L - L // 2)
        base = pos.detach().floor()
        frac = pos - base
        fracs.append((1 - frac, frac))
        low = low + (base.long() + (L // 2 + 1)) * strides[d]
        if normalize:  # reference "v1": divide by the sum of the element's in-grid taps
            b = base + L // 2
            s_d = (1 - frac) * ((b >= 0) & (b <= L - 1)) + frac * (b <= L - 2)
            norm = s_d if norm is None else norm * s_d
    # the 2^D corners (bit d set: the tap after the position along dim d), built dim by
    # dim so that partial products are shared
    taps_w = [weight / (norm + NORM_EPS) if normalize else weight]
    offsets = [0]
    for d in range(D):
        taps_w = [w * f for w in taps_w for f in fracs[d]]
        offsets = [o + bit * strides[d] for o in offsets for bit in (0, 1)]
    corners = (torch.tensor(offsets, device=P.device) if torch.compiler.is_compiling()
               else _offsets_tensor(tuple(offsets), P.device))  # never cache a traced tensor
    index = low.unsqueeze(-2) + corners.view(-1, 1)
    flat = weight.new_zeros(*lead, math.prod(padded)).scatter_add(
        -1, index.flatten(-2), torch.cat(taps_w, -1))
    kernel = flat.view(*lead, *padded)
    for d, L in enumerate(sizes):
        kernel = kernel.narrow(len(lead) + d, 1, L)
    return kernel


def _separable_kernel_torch(weight: Tensor, P: Tensor, SIG: Tensor, sizes: Sequence[int],
                            interpolation: str, grids: Sequence[Tensor],
                            window: Optional[Window] = None) -> Tensor:
    """Triangle/gaussian kernel as an ``einsum`` of the 1-D profiles (any D, device, dtype);
    only the taps in ``window`` (the normalisation still sums the whole profiles)."""
    profiles = [profile_1d(P[d] + (L // 2), SIG[d], grids[d].to(P.dtype), interpolation)
                for d, L in enumerate(sizes)]
    norm = profiles[0].sum(-1)
    for prof in profiles[1:]:
        norm = norm * prof.sum(-1)
    scale = weight / (norm + NORM_EPS)
    if interpolation == 'gaussian':
        bound = scale.abs()
        for prof in profiles:
            bound = bound * prof.amax(-1)
        info = torch.finfo(scale.dtype)
        cut = (bound.sum(-1) * (GAUSSIAN_CUT * info.eps)).clamp_min(info.tiny)
    if window is not None:
        profiles = [prof[..., lo:hi] for prof, (lo, hi) in zip(profiles, window)]
    # '...k,...ki,...kj->...ij' for D=2; torch contracts left to right, so the K-sum
    # is a batched matmul of (…, L_0, K) x (…, K, L_1) with no (L_0 x L_1 x K) temporary.
    letters = 'ijl'[:len(sizes)]
    spec = '...k,' + ','.join(f'...k{c}' for c in letters) + '->...' + letters
    kernel = torch.einsum(spec, scale, *profiles)
    if interpolation == 'gaussian':  # the tails (GAUSSIAN_CUT), also no subnormal value
        kernel = kernel.masked_fill(kernel.abs() < cut.view(*cut.shape, *[1] * len(sizes)), 0.0)
    return kernel


#: interpolation codes of the compiled op
_COMPILED_INTERP = {'triangle': 0, 'gaussian': 1}


class _SeparableKernel2d(torch.autograd.Function):
    """The triangle/gaussian construction for 2 learned dims by the compiled CPU ops
    (``backend='compiled'``) or the Triton kernels for GPUs (``'triton'``,
    :mod:`dcls_mm.ops.triton_construct`)."""

    @staticmethod
    def forward(ctx, weight: Tensor, P: Tensor, SIG: Tensor, sizes: Tuple[int, int],
                interpolation: str, window: Window, backend: str) -> Tensor:
        lead, K = weight.shape[:-1], weight.shape[-1]
        args = (weight.reshape(-1, K), P.reshape(2, -1, K), SIG.reshape(2, -1, K), *sizes)
        if backend == 'triton':
            out = triton_construct.separable_kernel(*args, interpolation, *_window_args(window))
            kept = out.new_empty(0)
        else:
            # the profiles (exponentials: most of the work) are kept for the backward when
            # one will come: C * K * (L_0 + L_1) floats, a few MiB at ConvNeXt sizes
            out, kept = torch.ops.dcls_mm.separable_kernel(
                *args, _COMPILED_INTERP[interpolation], *_window_args(window),
                keep_profiles=any(ctx.needs_input_grad[:3]))
        out = out.view(*lead, *(hi - lo for lo, hi in window))
        ctx.save_for_backward(weight, P, SIG, kept, out)
        ctx.sizes, ctx.interpolation, ctx.window = sizes, interpolation, window
        ctx.backend = backend
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight, P, SIG, kept, out = ctx.saved_tensors
        sizes, interpolation, window = ctx.sizes, ctx.interpolation, ctx.window
        if torch.is_grad_enabled():
            # backward(create_graph=True): the compiled backward has no derivative, so
            # differentiate the same formula through PyTorch's ops instead
            grids = [torch.arange(L, dtype=P.dtype, device=P.device) for L in sizes]
            out = _separable_kernel_torch(weight, P, SIG, sizes, interpolation, grids, window)
            return (*formula_gradients(out, (weight, P, SIG), ctx.needs_input_grad[:3], grad),
                    None, None, None, None)
        K = weight.shape[-1]
        args = (grad.reshape(-1, *grad.shape[-2:]).float(), weight.reshape(-1, K),
                P.reshape(2, -1, K), SIG.reshape(2, -1, K))
        # a cut tap (GAUSSIAN_CUT) passes no gradient: given the kernel, the ops ignore
        # the gradient where it is 0 (the cut taps, and only they)
        if ctx.backend == 'triton':
            dw, dP, dSIG = triton_construct.separable_kernel_backward(
                *args, *sizes, interpolation, *_window_args(window),
                out.reshape(-1, *out.shape[-2:]))
        else:
            mask = out.reshape(-1, *out.shape[-2:]) if interpolation == 'gaussian' else \
                out.new_empty(0)
            dw, dP, dSIG = torch.ops.dcls_mm.separable_kernel_backward(
                *args, kept, *sizes, _COMPILED_INTERP[interpolation], *_window_args(window),
                mask)
        return (dw.view(weight.shape), dP.view(P.shape), dSIG.view(SIG.shape),
                None, None, None, None)


class _BilinearKernel2d(torch.autograd.Function):
    """The bilinear construction for 2 learned dims by one pair of ops: the compiled CPU
    ops (``backend='compiled'``) or the Triton kernels for GPUs (``'triton'``, same
    signatures, :mod:`dcls_mm.ops.triton_construct`)."""

    @staticmethod
    def _ops(backend: str):
        if backend == 'triton':
            return triton_construct.bilinear_kernel, triton_construct.bilinear_kernel_backward
        return torch.ops.dcls_mm.bilinear_kernel, torch.ops.dcls_mm.bilinear_kernel_backward

    @staticmethod
    def forward(ctx, weight: Tensor, P: Tensor, sizes: Tuple[int, int], window: Window,
                backend: str) -> Tensor:
        lead, K = weight.shape[:-1], weight.shape[-1]
        out = _BilinearKernel2d._ops(backend)[0](weight.reshape(-1, K), P.reshape(2, -1, K),
                                                 *sizes, *_window_args(window))
        ctx.save_for_backward(weight, P)
        ctx.sizes, ctx.window, ctx.backend = sizes, window, backend
        return out.view(*lead, *(hi - lo for lo, hi in window))

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight, P = ctx.saved_tensors
        if torch.is_grad_enabled():
            # backward(create_graph=True): differentiate the scatter formula instead
            out = _slice_window(_bilinear_kernel(weight, P, ctx.sizes, normalize=False),
                                ctx.window)
            return (*formula_gradients(out, (weight, P), ctx.needs_input_grad[:2], grad),
                    None, None, None)
        K = weight.shape[-1]
        dw, dP = _BilinearKernel2d._ops(ctx.backend)[1](
            grad.reshape(-1, *grad.shape[-2:]).float(), weight.reshape(-1, K),
            P.reshape(2, -1, K), *ctx.sizes, *_window_args(ctx.window))
        return dw.view(weight.shape), dP.view(P.shape), None, None, None


def _slice_window(kernel: Tensor, window: Window) -> Tensor:
    """The ``window`` taps of a full kernel (its trailing dims are the learned ones)."""
    D = len(window)
    for d, (lo, hi) in enumerate(window):
        if (lo, hi) != (0, kernel.shape[kernel.dim() - D + d]):
            kernel = kernel.narrow(kernel.dim() - D + d, lo, hi - lo)
    return kernel


def _window_args(window: Window) -> Tuple[int, int, int, int]:
    """``(r0, nr, c0, nc)`` of a 2-D window, as the compiled ops take it."""
    (r0, r1), (c0, c1) = window
    return r0, r1 - r0, c0, c1 - c0


def construct_kernel(weight: Tensor, P: Tensor, SIG: Optional[Tensor],
                     dilated_kernel_size: Sequence[int], interpolation: str,
                     grids: Optional[Sequence[Tensor]] = None,
                     window: Optional[Window] = None) -> Tensor:
    """Build the dense DCLS kernel.

    Args:
        weight: ``(C_out, C_in/g, *dense, K)``.
        P: positions, ``(D, C_out, C_in/g, *dense, K)``, centred, ``D = len(dilated_kernel_size)``.
        SIG: like ``P`` for triangle/gaussian, else ``None``.
        dilated_kernel_size: ``(L_0, ..., L_{D-1})``, the learned dims.
        interpolation: canonical name (see :func:`canonical_interpolation`).
        grids: optional precomputed ``arange(L_d)`` tensors (module buffers; used by the
            triangle/gaussian construction).
        window: optional ``((start, stop), ...)`` per learned dim: build only those taps
            (a convolution on a feature map smaller than the kernel meets only part of
            it). The result equals the same slice of the full kernel (the normalisation
            still covers the whole kernel) and gradients flow as through that slice, but
            triangle/gaussian skip the work for the other taps. ``None``: every tap.

    Returns:
        Dense kernel ``(C_out, C_in/g, *dense, L_0, ..., L_{D-1})`` (the window's sizes
        instead of ``L_d`` with a ``window``) in the dtype of ``weight``.
    """
    D = len(dilated_kernel_size)
    if P.shape[0] != D or P.shape[1:] != weight.shape:
        raise ValueError(f'P must have shape ({D}, *weight.shape) = ({D}, {tuple(weight.shape)}), '
                         f'got {tuple(P.shape)}')
    sizes = tuple(dilated_kernel_size)
    full = tuple((0, L) for L in sizes)
    window = full if window is None else tuple(tuple(map(int, w)) for w in window)
    if len(window) != D or any(not 0 <= lo < hi <= L for (lo, hi), L in zip(window, sizes)):
        raise ValueError(f'window must be {D} (start, stop) pairs inside the dilated kernel '
                         f'{sizes}, got {window}')
    route = construction_route(interpolation, D, P, SIG)
    if route in ('compiled', 'triton') and interpolation == 'bilinear':
        return _BilinearKernel2d.apply(weight, P, sizes, window, route)
    if interpolation in ('bilinear', 'bilinear_normalized'):
        # the scatter costs O(C K 2^D) whatever the window: build all, slice
        return _slice_window(_bilinear_kernel(weight, P, sizes,
                                              normalize=interpolation == 'bilinear_normalized'),
                             window)
    if grids is None:
        grids = [torch.arange(L, device=P.device, dtype=P.dtype) for L in sizes]
    if route in ('compiled', 'triton'):
        return _SeparableKernel2d.apply(weight, P, SIG, sizes, interpolation, window, route)
    return _separable_kernel_torch(weight, P, SIG, sizes, interpolation, grids, window)


def support_radius(P: Tensor, SIG: Optional[Tensor], dilated_kernel_size: Sequence[int],
                   interpolation: str) -> int:
    """Distance from the kernel's centre tap beyond which no tap of the constructed
    kernel can be non-zero or pass a gradient to ``weight``/``P``/``SIG``, along every
    learned dim: the taps ``[L_d // 2 - r, L_d // 2 + r]`` hold the whole kernel and its
    whole derivative, so building and convolving only those is exact.

    Per element (centred position ``p``, width ``w = |SIG| + offset``):

    - bilinear (both kinds): the taps ``floor(p)`` and ``floor(p) + 1``, nothing else
      (whatever the weights: a zero weight or an integer position still reads the
      gradient of both taps);
    - triangle: ``relu(w - |i - p|)`` is 0, and so is its derivative, for ``|i - p| >= w``,
      so ``|i| <= ceil(|p| + w) - 1``;
    - gaussian: a tap is cut to 0 (:data:`GAUSSIAN_CUT`, and then passes no gradient)
      when ``|T| < eps' B`` with ``T = sum_e s_e a_0e(i) a_1e(j)`` and
      ``B = sum_e |s_e| max a_0e max a_1e``, ``eps' = GAUSSIAN_CUT * eps``. Term ``e`` is
      at most ``|s_e| max a_0e max a_1e * rho`` with ``rho`` the largest
      ``a_0e(i) / max a_0e`` over the elements, so ``|T| <= B rho`` and a row ``i`` where
      ``rho < eps' / 2`` is cut (the 2 covers float rounding of the sum). With ``i*`` the
      grid point nearest ``p``, that ratio is ``exp(-((i - p)^2 - (i* - p)^2) / (2 w^2))``,
      so only ``|i - p| <= w G + |i* - p|`` with ``G = sqrt(2 ln(2 / eps'))`` (6.8 in
      float32) can be non-zero.

    At the published initialisation (positions from N(0, 0.5)) this is a few taps: e.g.
    r = 3 of 8 for a bilinear dks-17 layer, so a layer convolves with a 7x7 kernel
    until its positions spread; trained kernels usually span the whole grid (r = L // 2).

    Args:
        P: positions ``(D, ..., K)``, centred.
        SIG: widths like ``P`` (triangle/gaussian), else ``None``.
        dilated_kernel_size: ``(L_0, ..., L_{D-1})``.
        interpolation: canonical name.

    Returns:
        ``r`` (a Python int, at most ``max(L_d) // 2``; reading it synchronises the
        device of ``P``).
    """
    # few ops: this runs before every forward of a cropping layer. In float64: the
    # parameters' own dtype (bf16) would round a sum such as |p| + |SIG| down onto a
    # whole number, one tap short of what the float32 construction reaches
    build64 = P.dtype == torch.float64
    P = P.detach().double()
    full = max(dilated_kernel_size) // 2
    if interpolation in ('bilinear', 'bilinear_normalized'):
        low, high = (v.item() for v in torch.aminmax(P))
        if not (math.isfinite(low) and math.isfinite(high)):
            return full  # the construction reports (or propagates) non-finite positions
        return min(max(-math.floor(low), math.floor(high) + 1), full)
    if interpolation == 'triangle':
        # the farthest tap with |i - p| < w
        reach = ((P.abs() + SIG.detach().double().abs()).amax().item()
                 + SIGMA_OFFSET['triangle'] - 1)
    elif interpolation == 'gaussian':
        eps = GAUSSIAN_CUT * torch.finfo(torch.float64 if build64 else torch.float32).eps
        spread = math.sqrt(2 * math.log(2 / eps))
        dist = P.abs()
        far = (dist + spread * SIG.detach().double().abs()).amax().item()
        # |i* - p|: 1/2 inside the grid, more for a position outside it (bounded with the
        # largest |p| and the smallest grid)
        nearest = 0.5 + max(0.0, dist.amax().item() - (min(dilated_kernel_size) // 2 - 1))
        reach = far + spread * SIGMA_OFFSET['gaussian'] + nearest
    else:
        raise ValueError(f'unknown interpolation {interpolation!r}')
    if not math.isfinite(reach):
        return full
    # the construction adds positions to L // 2 in float32: a margin of a few of its ulps
    return int(min(math.ceil(reach + 4 * full * 2.0 ** -23), full))


def gradient_support(P: Tensor, SIG: Optional[Tensor], dilated_kernel_size: Sequence[int],
                     interpolation: str, window: Optional[Window] = None) -> Optional[Tensor]:
    """The taps of a 2-D kernel whose gradient :func:`construct_kernel`'s backward reads:
    outside them, the gradient of ``weight``, ``P`` and ``SIG`` does not depend on the
    kernel's gradient (each element's taps and their derivatives are 0 there), so a
    convolution may leave its kernel gradient 0 there (the ``sparse`` kernel-gradient
    route of :mod:`dcls_mm.ops.depthwise`, which needs the compiled kernels).

    Per element, a rectangle (a superset of the exact taps, never a subset):

    - bilinear (both kinds): the rows ``floor(p)`` and ``floor(p) + 1`` (``p`` clamped to
      the grid's border cells; with ``p + L // 2`` rounded in float32 too, as the compiled
      construction adds it), the same for columns;
    - triangle: the rows with ``|i - p| <= w + 1e-3`` (the taps with ``|i - p| < w``, with
      a margin far above float32 rounding), ``w = |SIG| + 1``;
    - an element with a non-finite position or width: every tap of its channel.

    Args:
        P: positions ``(2, C_out, C_in/g, K)``, centred.
        SIG: widths like ``P`` (triangle), else ``None``.
        dilated_kernel_size: ``(L_0, L_1)``.
        interpolation: canonical name.
        window: the taps built, as for :func:`construct_kernel` (``None``: all).

    Returns:
        A bool tensor ``(C_out, C_in/g, n_rows, n_cols)`` over the window, or ``None``
        where :func:`has_gradient_support` is false.
    """
    if not has_gradient_support(P, interpolation):
        return None
    (L0, L1) = dilated_kernel_size
    (r0, r1), (c0, c1) = ((0, L0), (0, L1)) if window is None else window
    sig = SIG.detach().reshape(2, -1, P.shape[-1]) if interpolation == 'triangle' else None
    support = torch.ops.dcls_mm.gradient_support(
        P.detach().reshape(2, -1, P.shape[-1]), sig, SIGMA_OFFSET['triangle'], L0, L1, r0,
        r1 - r0, c0, c1 - c0)
    return support.view(*P.shape[1:-1], r1 - r0, c1 - c0)


def has_gradient_support(P: Tensor, interpolation: str) -> bool:
    """Whether :func:`gradient_support` has a rule for these positions: 2-D bilinear or
    triangle, float32 on the CPU, compiled kernels built. Gaussian: none (its support
    would be the kernel's non-zero taps, ~73% of a 23x23 kernel with spread positions,
    where the sparse kernel gradient measured no faster than the dense one)."""
    return (P.shape[0] == 2 and P.device.type == 'cpu' and P.dtype == torch.float32
            and interpolation in ('bilinear', 'bilinear_normalized', 'triangle')
            and extension.available())


def construction_route(interpolation: str, learned_dims: int, P: Tensor,
                       SIG: Optional[Tensor]) -> str:
    """How :func:`construct_kernel` builds a kernel (route ``construct``): ``'compiled'``
    (bilinear, triangle or gaussian with 2 learned dims, float32 on the CPU, compiled
    kernels built, not forced off by ``DCLS_MM_ROUTES=construct=torch``), ``'triton'``
    (bilinear with 2 learned dims, float32 on a GPU with Triton; triangle and gaussian
    too with ``DCLS_MM_ROUTES=construct=triton``), else the PyTorch ops:
    ``'scatter'`` (bilinear, and always for ``'bilinear_normalized'``) or ``'torch'``
    (the triangle/gaussian ``einsum``). Not measured: each compiled route replaces
    dozens of small PyTorch ops by one call.

    Args:
        interpolation: canonical name.
        learned_dims: number of learned dims ``D``.
        P: positions (their device and dtype decide).
        SIG: widths (``None`` for bilinear).
    """
    fallback = 'torch' if interpolation in WITH_SIGMA else 'scatter'
    forced = routes.forced('construct')
    if (interpolation == 'bilinear_normalized' or learned_dims != 2 or forced == 'torch'
            or torch.compiler.is_compiling()):
        return fallback
    # bilinear: by default on GPUs (measured there, README); triangle/gaussian: not yet
    # measured on a GPU, so only when forced; on the CPU only when forced (tests, through
    # Triton's interpreter)
    if (triton_construct.available(P) and (SIG is None or SIG.dtype == torch.float32)
            and (forced == 'triton' or (interpolation == 'bilinear' and P.device.type != 'cpu'
                                        # its taps are summed with atomics
                                        and not torch.are_deterministic_algorithms_enabled()))):
        return 'triton'
    if (P.device.type == 'cpu' and P.dtype == torch.float32
            and (SIG is None or SIG.dtype == torch.float32) and extension.available()):
        return 'compiled'
    return fallback
