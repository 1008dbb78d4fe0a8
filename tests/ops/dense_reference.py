"""Plain, slow reference of the DCLS method for the tests.

Written from the formulas in docs/dcls-method.md ("Interpolations"), independently of
dcls_mm.ops.kernel: every element is evaluated on the FULL grid (no separability), the
way the method paper states it.
"""
import itertools

import torch


def reference_kernel(weight, P, SIG, dilated_kernel_size, version):
    """Dense kernel (C_out, C_in/g, *dense, L_0, ..., L_{D-1}) evaluated element by element
    on the full grid, in float64."""
    weight, P = weight.detach().double(), P.detach().double()
    SIG = SIG.detach().double() if SIG is not None else None
    D = len(dilated_kernel_size)
    lead = weight.shape[:-1]
    K = weight.shape[-1]
    out = torch.zeros(*lead, *dilated_kernel_size, dtype=torch.float64)
    for idx in itertools.product(*[range(n) for n in lead]):
        for k in range(K):
            grid = torch.zeros(*dilated_kernel_size, dtype=torch.float64)
            for point in itertools.product(*[range(L) for L in dilated_kernel_size]):
                u = [point[d] - (P[(d, *idx, k)] + dilated_kernel_size[d] // 2) for d in range(D)]
                if version in ('v0', 'v1'):
                    val = 1.0
                    for d in range(D):
                        val = val * max(0.0, 1.0 - abs(float(u[d])))
                elif version == 'max':
                    val = 1.0
                    for d in range(D):
                        s = abs(float(SIG[(d, *idx, k)])) + 1.0
                        val = val * max(0.0, s - abs(float(u[d])))
                elif version == 'gauss':
                    q = 0.0
                    for d in range(D):
                        s = abs(float(SIG[(d, *idx, k)])) + 0.27
                        q += (float(u[d]) / s) ** 2
                    val = torch.exp(torch.tensor(-0.5 * q, dtype=torch.float64)).item()
                else:
                    raise ValueError(version)
                grid[point] = val
            if version != 'v0':
                grid = grid / (grid.sum() + 1e-7)
            out[idx] += float(weight[(*idx, k)]) * grid
    return out


def reference_gauss_axis_kernel(weight, P, SIG, dilated_kernel_size):
    """Dense 2-D kernel of the reference DCLS package's ``gauss`` interpolation, with ITS
    axis convention (docs/dcls-method.md, "Axis order of the positions"): ``P[0]``/``SIG[0]``
    act on the column (x) coordinate, centred with ``dks[0] // 2``, and ``P[1]``/``SIG[1]``
    on the row (y) coordinate, centred with ``dks[1] // 2``.

    What a checkpoint of the reference package means; loading one into dcls-mm must
    reproduce it, which a plain load (ours is row-first) does not.

    Args:
        weight: ``(C_out, C_in / groups, K)`` weights.
        P: ``(2, C_out, C_in / groups, K)`` positions in the reference package's order.
        SIG: ``(2, C_out, C_in / groups, K)`` widths in the same order.
        dilated_kernel_size: ``(H, W)`` of the dense kernel, or one int for a square one.

    Returns:
        The ``(C_out, C_in / groups, H, W)`` kernel in float64.
    """
    H, W = ((dilated_kernel_size, ) * 2 if isinstance(dilated_kernel_size, int)
            else dilated_kernel_size)
    weight, P, SIG = weight.double(), P.double(), SIG.double()
    rows = torch.arange(H, dtype=torch.float64).view(H, 1, 1, 1, 1)
    cols = torch.arange(W, dtype=torch.float64).view(1, W, 1, 1, 1)
    u_col = cols - (P[0] + H // 2)
    u_row = rows - (P[1] + W // 2)
    s_col, s_row = SIG[0].abs() + 0.27, SIG[1].abs() + 0.27
    grid = torch.exp(-0.5 * ((u_col / s_col) ** 2 + (u_row / s_row) ** 2))
    grid = grid / (grid.sum((0, 1)) + 1e-7)
    return (grid * weight).sum(-1).permute(2, 3, 0, 1)
