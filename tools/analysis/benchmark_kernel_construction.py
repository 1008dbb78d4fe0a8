"""Benchmark DCLS kernel construction: separable (dcls-mm) vs dense formulation.

For the ConvNeXt-dcls depthwise layer shapes (C_out = C, C_in/g = 1, K elements, dilated
kernel dks x dks) it times construction forward + backward (median of repeats after
warm-up) and measures peak memory, for:

- ``separable``: ``dcls_mm.ops.construct_kernel`` (the compiled ops when built, else
  bilinear: ``scatter_add`` of the taps, triangle/gaussian: the einsum below);
- ``einsum`` (gaussian only here): the PyTorch fallback, an ``einsum`` of the 1-D
  profiles (a batched matmul of one tiny GEMM per channel on the CPU);
- ``dense``: the direct formulation, evaluating every element on the full grid
  (a ``(dks, dks, C, 1, K)`` temporary), as the method is usually written;
- ``reference``: the reference package ``DCLS`` (``pip install dcls``), when installed.

Peak memory: tensor memory allocated during one forward + backward
(:func:`dcls_mm.utils.peak_memory_mib`).

Example::

    python tools/analysis/benchmark_kernel_construction.py --out work_dirs/kernel_bench.json
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from dcls_mm.ops.kernel import (WITH_SIGMA, _separable_kernel_torch, canonical_interpolation,
                                construct_kernel)
from dcls_mm.utils import peak_memory_mib, time_fn

#: (model, stage widths, kernel_count) from the paper (dks 17).
MODELS = {'tiny': ((96, 192, 384, 768), 34), 'small': ((96, 192, 384, 768), 40),
          'base': ((128, 256, 512, 1024), 40)}


def dense_kernel(weight, P, SIG, dks, interpolation):
    """Direct formulation: an index tensor of every grid point for every element,
    ``(L0, L1, 2, C_out, C_in/g, K)``, evaluated and reduced over the learned dims, the
    way the method is usually implemented (and the reference package does)."""
    L0, L1 = dks
    coords = torch.stack(torch.meshgrid(torch.arange(L0, dtype=P.dtype, device=P.device),
                                        torch.arange(L1, dtype=P.dtype, device=P.device),
                                        indexing='ij'))
    coords = coords.view(L0, L1, 2, 1, 1, 1).expand(L0, L1, 2, *P.shape[1:])
    centre = torch.tensor([L0 // 2, L1 // 2], dtype=P.dtype, device=P.device).view(2, 1, 1, 1)
    diff = coords - (P + centre)
    if interpolation.startswith('bilinear'):
        X = torch.relu(1 - diff.abs()).prod(2)
    else:
        X = torch.exp(-0.5 * (diff / (SIG.abs() + 0.27)).pow(2).sum(2))
    if interpolation != 'bilinear':
        X = X / (X.sum((0, 1)) + 1e-7)
    return (X * weight).sum(-1).permute(2, 3, 0, 1)


def make_inputs(C, K, dks, interpolation, device):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(C, 1, K, generator=g).to(device).requires_grad_()
    P = ((torch.rand(2, C, 1, K, generator=g) * 2 - 1) * (dks // 2)).to(device).requires_grad_()
    SIG = (torch.full((2, C, 1, K), 0.23).to(device).requires_grad_()
           if interpolation == 'gaussian' else None)
    return w, P, SIG


def make_fn(method, C, K, dks, interpolation, device):
    w, P, SIG = make_inputs(C, K, dks, interpolation, device)
    # A dense upstream gradient, as the convolution's backward gives (``.sum().backward()``
    # would feed a stride-0 gradient that sends CPU bmm down a slow per-batch path).
    grad = torch.randn(C, 1, dks, dks, generator=torch.Generator().manual_seed(1)).to(device)
    if method == 'separable':
        def fn():
            construct_kernel(w, P, SIG, (dks, dks), interpolation).backward(grad)
    elif method == 'einsum':
        grids = [torch.arange(dks, dtype=P.dtype, device=P.device)] * 2

        def fn():
            _separable_kernel_torch(w, P, SIG, (dks, dks), interpolation, grids).backward(grad)
    elif method == 'dense':
        def fn():
            dense_kernel(w, P, SIG, (dks, dks), interpolation).backward(grad)
    elif method == 'reference':
        from DCLS.construct.modules import Dcls2d  # noqa: the optional reference package
        version = {'bilinear': 'v0', 'bilinear_normalized': 'v1', 'gaussian': 'gauss'}[interpolation]
        m = Dcls2d(C, C, K, dilated_kernel_size=dks, groups=C, padding=dks // 2,
                   version=version).to(device)
        def fn():
            m.DCK(m.weight, m.P, m.SIG).backward(grad)
    else:
        raise ValueError(f'unknown method {method!r}')
    return fn


def reference_available():
    try:
        import DCLS.construct.modules  # noqa: F401
        return True
    except Exception:  # noqa: BLE001 - any failure means "not usable here"
        return False


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--models', nargs='+', default=list(MODELS), choices=list(MODELS))
    parser.add_argument('--dks', type=int, default=17)
    parser.add_argument('--interpolation', default='bilinear',
                        choices=['bilinear', 'bilinear_normalized', 'gaussian'])
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--out', help='write the results as JSON to this file')
    args = parser.parse_args(argv)
    interp = canonical_interpolation(args.interpolation)
    methods = (['separable', 'dense'] + (['einsum'] if interp in WITH_SIGMA else [])
               + (['reference'] if reference_available() else []))
    print(f'device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} '
          f'dks={args.dks} interpolation={interp} methods={methods}', flush=True)
    header = (f'{"model":6} {"C":>5} {"K":>3} ' + ' '.join(f'{m + " ms":>13} {m + " MiB":>13}'
                                                         for m in methods)
              + f' {"speed-up":>9} {"mem ratio":>9}'
              + (f' {"vs ref":>7} {"ref mem":>7}' if 'reference' in methods else ''))
    print(header)
    rows = []
    for model in args.models:
        widths, K = MODELS[model]
        for C in widths:
            row = dict(model=model, C=C, K=K, dks=args.dks, interpolation=interp)
            for method in methods:
                # one method at a time: the dense/reference ones allocate hundreds of MiB,
                # which would disturb an interleaved measurement of the small one
                fn = make_fn(method, C, K, args.dks, interp, args.device)
                row[f'{method}_ms'] = 1000 * time_fn(fn, args.device, args.repeats)
                row[f'{method}_peak_mib'] = peak_memory_mib(
                    make_fn(method, C, K, args.dks, interp, args.device), args.device)
            row['speedup_vs_dense'] = row['dense_ms'] / row['separable_ms']
            row['memory_ratio_vs_dense'] = row['dense_peak_mib'] / max(row['separable_peak_mib'], 1e-3)
            ref = ''
            if 'reference' in methods:
                row['speedup_vs_reference'] = row['reference_ms'] / row['separable_ms']
                row['memory_ratio_vs_reference'] = (row['reference_peak_mib']
                                                    / max(row['separable_peak_mib'], 1e-3))
                ref = (f' {row["speedup_vs_reference"]:6.1f}x'
                       f' {row["memory_ratio_vs_reference"]:6.1f}x')
            rows.append(row)
            cells = ' '.join(f'{row[m + "_ms"]:13.2f} {row[m + "_peak_mib"]:13.1f}' for m in methods)
            print(f'{model:6} {C:5d} {K:3d} {cells} {row["speedup_vs_dense"]:8.1f}x '
                  f'{row["memory_ratio_vs_dense"]:8.1f}x{ref}', flush=True)
    worst_speed = min(r['speedup_vs_dense'] for r in rows)
    worst_mem = min(r['memory_ratio_vs_dense'] for r in rows)
    print(f'worst speed-up vs dense: {worst_speed:.1f}x (target >= 30x); '
          f'worst peak-memory ratio: {worst_mem:.1f}x (target >= 10x)')
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, 'w') as f:
            json.dump(dict(device=args.device, torch=torch.__version__, rows=rows), f, indent=2)
        print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
