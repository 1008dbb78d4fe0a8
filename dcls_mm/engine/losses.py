"""Repulsive loss between the positions of the elements of one DCLS kernel."""
from __future__ import annotations

from typing import Iterable, Union

import torch
from torch import Tensor, nn

from .utils import position_parameters


def layer_repulsive_loss(P: Tensor) -> Tensor:
    """Repulsive term of one position tensor.

    ``2 * sum_{a<b} relu(1 - ||p_a - p_b||_2) / (K * (K - 1) * G)`` where ``p_a`` are the
    ``D``-dim positions of the ``K`` elements of one kernel and ``G`` the number of
    kernels (``C_out * C_in/groups``, times the dense taps for the N_M variants).

    Args:
        P: positions ``(D, C_out, C_in/groups, [*dense,] K)``.

    Returns:
        A scalar in ``[0, 1]`` (0 when ``K == 1``).
    """
    dims, count = P.shape[0], P.shape[-1]
    if count < 2:
        return P.sum() * 0.0
    points = P.reshape(dims, -1, count).permute(1, 2, 0)  # (G, K, D)
    a, b = torch.triu_indices(count, count, offset=1, device=P.device)
    # vector_norm's backward is 0 (not NaN) at coinciding points.
    dist = torch.linalg.vector_norm(points[:, a] - points[:, b], dim=-1)  # (G, pairs)
    return 2 * torch.relu(1 - dist).sum() / (count * (count - 1) * points.shape[0])


def repulsive_loss(model_or_layers: Union[nn.Module, Iterable[nn.Module]]) -> Tensor:
    """Repulsive loss of the DCLS paper: the mean over DCLS position tensors of
    :func:`layer_repulsive_loss`.

    Positions shared by several layers (ConvNeXt-dcls ``share_positions``) are one set of
    positions and are counted once. The paper adds ``rep ** 2`` to the task loss (see
    :class:`dcls_mm.engine.RepulsiveLossHook`).

    Args:
        model_or_layers: a model (its DCLS layers are found by
            :func:`dcls_mm.engine.utils.dcls_modules`) or an iterable of DCLS layers.

    Returns:
        A scalar tensor (0 without DCLS layers) that back-propagates into the positions.
    """
    positions = [P for _, P in position_parameters(model_or_layers, attrs=('P',))]
    if not positions:
        return torch.zeros(())
    return torch.stack([layer_repulsive_loss(P.float()) for P in positions]).mean()
