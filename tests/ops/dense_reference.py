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
