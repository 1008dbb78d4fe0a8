"""Separable construction of DCLS kernels.

Each of the ``kernel_count`` elements of a DCLS kernel is a weight ``w`` at a continuous
position ``p`` (one coordinate per learned dim). The dense kernel is the sum over
elements of ``w`` spread onto the integer grid by an interpolation. Every supported
interpolation is a *product of 1-D profiles*, one per learned dim, and so is its
normalisation. The dense kernel is therefore an ``einsum`` of small factors::

    K[..., i, j] = sum_k  s[..., k] * A_0[..., k, i] * A_1[..., k, j]

with ``A_d`` of shape ``(..., K, L_d)`` and ``s = w`` (or ``w / Z``). Memory is
``O(C * K * sum(L_d))`` instead of the ``O(C * K * prod(L_d))`` of a direct evaluation.

Axis convention (one for every interpolation): ``P[d]`` is the position along the
d-th *learned* kernel dim, in the order of the kernel tensor's trailing dims (for 2-D:
``P[0]`` = height/rows, ``P[1]`` = width/columns), centred: the grid coordinate is
``P[d] + L_d // 2``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

#: Canonical interpolation names and the reference package's names for them.
INTERPOLATIONS = ('bilinear', 'bilinear_normalized', 'triangle', 'gaussian')
VERSION_ALIASES = {
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


def canonical_interpolation(version: str) -> str:
    """Map a reference (``'v0'``, ``'v1'``, ``'max'``, ``'gauss'``) or readable name to
    its canonical name in :data:`INTERPOLATIONS`.

    Raises:
        ValueError: for an unknown name.
    """
    try:
        return VERSION_ALIASES[version]
    except (KeyError, TypeError):
        raise ValueError(f'version must be one of {sorted(VERSION_ALIASES)}, got {version!r}') from None


def profile_1d(pos: Tensor, sig: Optional[Tensor], grid: Tensor, interpolation: str) -> Tensor:
    """1-D interpolation profile of every element along one learned dim.

    Args:
        pos: positions on the grid (already shifted by ``L // 2``), shape ``(..., K)``.
        sig: raw ``SIG`` of the same shape (triangle/gaussian), else ``None``.
        grid: ``arange(L)`` in the dtype of ``pos``, shape ``(L,)``.
        interpolation: canonical interpolation name.

    Returns:
        Tensor of shape ``(..., K, L)``.
    """
    if interpolation in ('bilinear', 'bilinear_normalized'):
        # Two scattered taps instead of relu(1 - |u|) over the grid: same values, fewer
        # (..., K, L) temporaries, and at integer positions (e.g. clamped to a border) the
        # position keeps a one-sided gradient instead of zero, as in the reference "v0"
        # kernels the published checkpoints were trained with. Slots 0 and L+1 catch taps
        # that fall outside the grid and are dropped.
        L = grid.shape[0]
        base = pos.detach().floor()
        frac = (pos - base).unsqueeze(-1)
        left = (base + 1).clamp(0, L + 1).long().unsqueeze(-1)
        right = (base + 2).clamp(0, L + 1).long().unsqueeze(-1)
        taps = torch.zeros(*pos.shape, L + 2, dtype=pos.dtype, device=pos.device)
        taps = taps.scatter(-1, left, 1 - frac).scatter(-1, right, frac)
        return taps[..., 1:L + 1]
    u = grid - pos.unsqueeze(-1)
    width = (sig.abs() + SIGMA_OFFSET[interpolation]).unsqueeze(-1)
    if interpolation == 'triangle':
        return torch.relu(width - u.abs())
    if interpolation == 'gaussian':
        return torch.exp(-0.5 * (u / width) ** 2)
    raise ValueError(f'unknown interpolation {interpolation!r}')


def construct_kernel(weight: Tensor, P: Tensor, SIG: Optional[Tensor],
                     dilated_kernel_size: Sequence[int], interpolation: str,
                     grids: Optional[Sequence[Tensor]] = None) -> Tensor:
    """Build the dense DCLS kernel.

    Args:
        weight: ``(C_out, C_in/g, *dense, K)``.
        P: positions, ``(D, C_out, C_in/g, *dense, K)``, centred, ``D = len(dilated_kernel_size)``.
        SIG: like ``P`` for triangle/gaussian, else ``None``.
        dilated_kernel_size: ``(L_0, ..., L_{D-1})``, the learned dims.
        interpolation: canonical name (see :func:`canonical_interpolation`).
        grids: optional precomputed ``arange(L_d)`` tensors (module buffers).

    Returns:
        Dense kernel ``(C_out, C_in/g, *dense, L_0, ..., L_{D-1})`` in the dtype of ``weight``.
    """
    D = len(dilated_kernel_size)
    if P.shape[0] != D or P.shape[1:] != weight.shape:
        raise ValueError(f'P must have shape ({D}, *weight.shape) = ({D}, {tuple(weight.shape)}), '
                         f'got {tuple(P.shape)}')
    if grids is None:
        grids = [torch.arange(L, device=P.device, dtype=P.dtype) for L in dilated_kernel_size]
    profiles = []
    for d, L in enumerate(dilated_kernel_size):
        sig = SIG[d] if SIG is not None else None
        profiles.append(profile_1d(P[d] + (L // 2), sig, grids[d].to(P.dtype), interpolation))
    scale = weight
    if interpolation != 'bilinear':
        norm = profiles[0].sum(-1)
        for prof in profiles[1:]:
            norm = norm * prof.sum(-1)
        scale = weight / (norm + NORM_EPS)
    # '...k,...ki,...kj->...ij' for D=2; torch contracts left to right, so the K-sum
    # is a batched matmul of (…, L_0, K) x (…, K, L_1) with no (L_0 x L_1 x K) temporary.
    letters = 'ijl'[:D]
    spec = '...k,' + ','.join(f'...k{c}' for c in letters) + '->...' + letters
    return torch.einsum(spec, scale, *profiles)
