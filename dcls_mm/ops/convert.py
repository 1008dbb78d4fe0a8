"""Conversion from the reference package's position axis order to dcls-mm's.

The reference package's ``'v0'`` kernels (and the published ConvNeXt-dcls checkpoints)
use ``P[0]`` = first kernel dim (height for 2-D), like dcls-mm. Its ``'v1'``, ``'max'``
and ``'gauss'`` kernels pair ``P[0]`` with the LAST kernel dim (width), ``P[1]`` with
the one before, and so on, while still centring ``P[d]`` with ``dilated_kernel_size[d] // 2``.
Loading such a state dict unchanged silently transposes every kernel; these helpers
reorder (and, for non-square kernels, re-centre) the positions.
"""
from __future__ import annotations

from typing import Dict, Sequence, Union

from torch import Tensor


def convert_reference_positions(P: Tensor, dilated_kernel_size: Union[int, Sequence[int]],
                                is_sigma: bool = False) -> Tensor:
    """Convert reference ``'v1'``/``'max'``/``'gauss'`` positions (or SIG) to dcls-mm order.

    Args:
        P: ``(D, ...)`` positions (or widths) in the reference order, ``D`` in {1, 2, 3}.
        dilated_kernel_size: the layer's ``dilated_kernel_size`` (int or ``D`` ints).
        is_sigma: ``True`` for ``SIG``: reordered only, no re-centring.

    Returns:
        A new tensor with ``out[d]`` describing kernel dim ``d`` (dim 0 = height for 2-D):
        ``out[d] = P[D-1-d] + L_{D-1-d} // 2 - L_d // 2`` (positions) or ``P[D-1-d]`` (SIG),
        which yields exactly the reference kernel.
    """
    D = P.shape[0]
    sizes = (dilated_kernel_size,) * D if isinstance(dilated_kernel_size, int) else tuple(dilated_kernel_size)
    if len(sizes) != D:
        raise ValueError(f'dilated_kernel_size {dilated_kernel_size!r} does not match the {D} '
                         f'position dims of a tensor of shape {tuple(P.shape)}')
    out = P.flip(0).clone()
    if not is_sigma:
        for d in range(D):
            out[d] += sizes[D - 1 - d] // 2 - sizes[d] // 2
    return out


def convert_reference_state_dict(state_dict: Dict[str, Tensor],
                                 dilated_kernel_size: Union[int, Sequence[int]]) -> Dict[str, Tensor]:
    """Convert every ``P`` / ``SIG`` entry of a reference ``'v1'``/``'max'``/``'gauss'``
    state dict to dcls-mm's axis order (other entries are returned unchanged).

    Args:
        state_dict: reference state dict; DCLS entries are the keys named ``P``/``SIG`` or
            ending in ``.P``/``.SIG``.
        dilated_kernel_size: the ``dilated_kernel_size`` shared by those layers.

    Returns:
        A new dict.
    """
    out = {}
    for key, value in state_dict.items():
        leaf = key.rsplit('.', 1)[-1]
        if leaf in ('P', 'SIG') and value.dim() >= 2 and value.shape[0] > 1:
            value = convert_reference_positions(value, dilated_kernel_size, is_sigma=leaf == 'SIG')
        out[key] = value
    return out
