"""Speed and memory of DCLS depthwise layers and ConvNeXt-T-dcls against ConvNeXt-T.

Every number is a ratio against a baseline measured in the same run (median of
repeats after warm-up, interleaved), because machines are noisy:

- layer: ``Dcls2d`` depthwise forward+backward at the four ConvNeXt-T stage shapes
  (batch 8, 224 input: C 96/192/384/768 at 56/28/14/7) against ``nn.Conv2d`` 7x7
  depthwise on the same input, for each interpolation (bilinear: dks 17, K 34; gaussian
  and triangle: dks 23, K 26, the published gaussian model's setting); with the
  convolution alone (the kernel as a leaf tensor) and the kernel construction alone
  (forward+backward), whose share of the convolution is printed (target < 10%); the
  output gradient is random at the 1e-6 scale a ConvNeXt block's layer scale gives it;
- model: ConvNeXt-T-dcls (timm ``convnext_dcls_tiny``) of each interpolation, training
  step (forward + backward) and inference against timm ``convnext_tiny``, and the peak
  memory of the training step; on CUDA, throughput in images/s with AMP (batch 64).

Positions (``--positions``): ``init`` as initialised (N(0, 0.5): near the centre, where
the layers convolve with only the few taps their kernels can reach, see
:func:`dcls_mm.ops.kernel.support_radius`), ``spread`` uniform over the whole dilated
kernel, as in trained models (every tap reachable: the cost a trained model pays).

The header prints the CPU, ATen's CPU capability (``torch.backends.cpu.get_cpu_capability()``),
oneDNN's ISA cap and the compiled kernels' instruction-set copy; every layer row and
every model prints the routes it ran (forward: measured ``direct``/``onednn``; kernel
gradient: measured ``direct``/``fft``, :mod:`dcls_mm.ops.routes`; construction:
``scatter``/``compiled``/``torch``).
To emulate an AVX2-only x86 CPU on an AVX-512 one::

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python tools/analysis/benchmark_convnext_dcls.py

(the compiled kernels follow ATen's capability and run their x86-64-v3 copy).

Targets (issue 13): layer <= 1.5x, training step <= 1.2x, inference <= 1.1x, training
peak memory <= 1.1x, for every interpolation; on CUDA throughput >= 0.95x.

Example::

    python tools/analysis/benchmark_convnext_dcls.py --out work_dirs/bench_convnext_dcls.json
"""
from __future__ import annotations

import argparse
from collections import OrderedDict

import timm
import torch
import torch.nn as nn

import dcls_mm.models  # noqa: F401  (registers convnext_dcls_* in timm)
from dcls_mm.ops import Dcls2d, set_impl
from dcls_mm.utils import (DclsRouteRecorder, dcls_layer_routes, machine_info, machine_line,
                           peak_memory_mib, routes_text, spread_positions, time_fn, time_fns,
                           write_json)

STAGES = ((96, 56), (192, 28), (384, 14), (768, 7))
#: interpolation -> (dilated kernel size, kernel count) of the benchmarked models
VARIANTS = OrderedDict(bilinear=(17, 34), gaussian=(23, 26), triangle=(23, 26))
POSITIONS = ('spread', 'init')


def set_positions(model: nn.Module, positions: str) -> nn.Module:
    """``'spread'``: :func:`dcls_mm.utils.spread_positions`; ``'init'``: as initialised."""
    return spread_positions(model) if positions == 'spread' else model


def layer_rows(args, device):
    rows = []
    print(f'\n[layer] fwd+bwd, batch {args.batch} (ms; ratio vs 7x7 on the same input; '
          'construct share = construction / convolution alone)')
    print(f'{"interp":9} {"pos":>6} {"dks":>3} {"K":>3} {"C":>4} {"HxW":>6} {"input":>13} {"7x7":>7} '
          f'{"dcls":>7} {"ratio":>6} {"conv":>7} {"constr":>7} {"share":>6} {"plain":>8} '
          f'{"ratio":>6} {"taps":>5}  routes')
    for interp, positions in ((i, p) for i in args.interpolations for p in args.positions):
        dks, K = VARIANTS[interp]
        for C, H in STAGES:
            for layout in args.layouts:
                torch.manual_seed(0)
                x = torch.randn(args.batch, C, H, H, device=device)
                if layout == 'channels_last':
                    x = x.contiguous(memory_format=torch.channels_last)
                x.requires_grad_(True)
                dcls = Dcls2d(C, C, K, padding='same', dilated_kernel_size=dks, groups=C,
                              interpolation=interp).to(device)
                set_positions(dcls, positions)
                dense = nn.Conv2d(C, C, 7, padding=3, groups=C).to(device)
                # the taps this map meets (all but on maps smaller than the kernel)
                window = dcls.kernel_window(x)
                leaf = dcls.construct_kernel(window).detach().requires_grad_(True)
                kernel_grad = torch.randn_like(leaf)
                # an output gradient of the size a ConvNeXt block passes its depthwise conv
                # (layer scale 1e-6): products with it go subnormal where a kernel has
                # tiny taps, which a gradient of ones would hide
                grad_y = (1e-6 * torch.randn_like(x)).detach()

                def step(m):
                    def run():
                        m(x).backward(grad_y)
                    return run

                def conv_alone():
                    dcls.conv(x, leaf, window).backward(grad_y)

                def construct_alone():
                    dcls.construct_kernel(window).backward(kernel_grad)

                row = dict(interpolation=interp, positions=positions, dks=dks, K=K, C=C, H=H,
                           layout=layout,
                           kernel=list(leaf.shape[-2:]))
                times = time_fns([step(dense), step(dcls), conv_alone, construct_alone], device,
                                 args.repeats)
                for name, t in zip(('dense7_ms', 'dcls_ms', 'conv_ms', 'construct_ms'), times):
                    row[name] = 1e3 * t
                row['ratio'] = row['dcls_ms'] / row['dense7_ms']
                row['construct_share'] = row['construct_ms'] / row['conv_ms']
                row['routes'] = dcls_layer_routes(dcls, x.shape, x.dtype, x.device)
                if not args.skip_plain:
                    dcls.impl = 'plain'
                    row['plain_ms'] = 1e3 * time_fn(step(dcls), device,
                                                    max(1, args.repeats // 2), 1)
                rows.append(row)
                plain = (f'{row["plain_ms"]:8.1f} {row["plain_ms"] / row["dense7_ms"]:5.1f}x'
                         if 'plain_ms' in row else f'{"":8} {"":6}')
                print(f'{interp:9} {positions:>6} {dks:3d} {K:3d} {C:4d} {H:3d}x{H:<3d}{layout:>13} '
                      f'{row["dense7_ms"]:7.1f} {row["dcls_ms"]:7.1f} {row["ratio"]:5.2f}x '
                      f'{row["conv_ms"]:7.1f} {row["construct_ms"]:7.2f} '
                      f'{100 * row["construct_share"]:5.1f}% {plain} '
                      f'{"x".join(map(str, row["kernel"])):>5}  '
                      f'{routes_text(row["routes"])}', flush=True)
    return rows


def model_rows(args, device):
    torch.manual_seed(0)
    models = OrderedDict(convnext_tiny=timm.create_model('convnext_tiny').to(device))
    for interp, positions in ((i, p) for i in args.interpolations for p in args.positions):
        dks, K = VARIANTS[interp]
        models[f'convnext_dcls_tiny_{interp}_{positions}'] = set_positions(timm.create_model(
            'convnext_dcls_tiny', interpolation=interp, dilated_kernel_size=dks,
            kernel_count=K), positions).to(device)
    x = torch.randn(args.batch, 3, 224, 224, device=device)
    target = torch.randint(0, 1000, (args.batch,), device=device)
    loss_fn = nn.CrossEntropyLoss()
    result = OrderedDict()
    print(f'\n[model] batch {args.batch}, 224x224 (ms; ratio vs convnext_tiny)')

    def train_step(model):
        def run():
            model.train()
            model.zero_grad(set_to_none=True)
            loss_fn(model(x), target).backward()
        return run

    def infer(model):
        def run():
            model.eval()
            with torch.inference_mode():
                model(x)
        return run
    names = list(models)
    recorders = {n: DclsRouteRecorder(models[n]) for n in names[1:]}
    train_s = time_fns([train_step(models[n]) for n in names], device, args.repeats)
    infer_s = time_fns([infer(models[n]) for n in names], device, args.repeats)
    for name, t_train, t_infer in zip(names, train_s, infer_s):
        model = models[name]
        entry = dict(train_ms=1e3 * t_train, infer_ms=1e3 * t_infer)
        entry['train_peak_mib'] = peak_memory_mib(train_step(model), device)
        model.zero_grad(set_to_none=True)
        if name in recorders:
            entry['routes'] = recorders[name].report()
        result[name] = entry
    if not args.skip_plain:
        dcls = models[names[1]]
        set_impl(dcls, 'plain')
        result[f'{names[1]}_plain'] = dict(train_ms=1e3 * time_fn(train_step(dcls), device, 1, 0))
        set_impl(dcls, 'auto')
    base = result['convnext_tiny']
    ratios = OrderedDict()
    for name in names[1:]:
        ours = result[name]
        ratios[name] = dict(train=ours['train_ms'] / base['train_ms'],
                            infer=ours['infer_ms'] / base['infer_ms'],
                            memory=ours['train_peak_mib'] / base['train_peak_mib'])
    print(f'{"model":40} {"train ms":>10} {"infer ms":>10} {"train peak MiB":>15}')
    for name, e in result.items():
        print(f'{name:40} {e["train_ms"]:10.1f} {e.get("infer_ms", float("nan")):10.1f} '
              f'{e.get("train_peak_mib", float("nan")):15.1f}')
    for name, r in ratios.items():
        print(f'ratios {name}/convnext_tiny: train {r["train"]:.2f}x (target <= 1.2), '
              f'inference {r["infer"]:.2f}x (target <= 1.1), '
              f'peak memory {r["memory"]:.2f}x (target <= 1.1)')
    for name in names[1:]:
        print(f'routes {name}: {DclsRouteRecorder.summary(result[name]["routes"])}')
    return dict(models=result, ratios=ratios)


def throughput(device: str, interpolations=('bilinear',), batch: int = 64, repeats: int = 5,
               plain: bool = False) -> dict:
    """images/s of an AdamW training step with AMP (bf16 autocast) at ``batch``, models
    timed interleaved; run on CUDA by :func:`main` (batch 64), callable on any device.
    ``plain`` adds each ConvNeXt-T-dcls on the plain path, to see what the fast path
    gains on that device."""
    torch.manual_seed(0)
    models = OrderedDict(convnext_tiny=timm.create_model('convnext_tiny'))
    for interp in interpolations:
        dks, K = VARIANTS[interp]
        for impl in ('auto', 'plain') if plain else ('auto',):
            model = timm.create_model('convnext_dcls_tiny', interpolation=interp,
                                      dilated_kernel_size=dks, kernel_count=K)
            models[f'convnext_dcls_tiny_{interp}' + ('_plain' if impl == 'plain' else '')] = \
                set_impl(model, impl)
    x = torch.randn(batch, 3, 224, 224, device=device).contiguous(
        memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (batch,), device=device)

    def train_step(model):
        model = model.to(device).to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(model(x), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step
    recorders = {name: DclsRouteRecorder(m) for name, m in models.items()
                 if name != 'convnext_tiny'}
    seconds = time_fns([train_step(m) for m in models.values()], device, repeats, 3)
    out = OrderedDict((name, batch / s) for name, s in zip(models, seconds))
    routes = {name: r.report() for name, r in recorders.items()}
    ratios = OrderedDict((name, v / out['convnext_tiny']) for name, v in out.items()
                         if name != 'convnext_tiny')
    print(f'\n[throughput] training, AMP bf16, batch {batch} (img/s; ratio vs convnext_tiny, '
          'target on GPU >= 0.95)')
    for name, v in out.items():
        print(f'{name:34} {v:9.1f}' + (f'  {ratios[name]:.3f}' if name in ratios else ''))
    for name, layer_routes in routes.items():
        print(f'routes {name}: {DclsRouteRecorder.summary(layer_routes)}')
    return dict(batch=batch, images_per_s=out, ratios=ratios, routes=routes)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--interpolations', nargs='+', default=list(VARIANTS),
                        choices=list(VARIANTS))
    parser.add_argument('--positions', nargs='+', default=list(POSITIONS), choices=POSITIONS,
                        help='DCLS positions: spread over the kernel (as trained) and/or as '
                             'initialised (near the centre)')
    parser.add_argument('--layouts', nargs='+', default=['channels_last'],
                        choices=['nchw', 'channels_last'], help='input layouts of the layer part')
    parser.add_argument('--skip-plain', action='store_true',
                        help='skip the (slow on CPU) plain-path numbers')
    parser.add_argument('--only', choices=['layer', 'model'], help='run one part only')
    parser.add_argument('--out', help='write results as JSON to this file')
    args = parser.parse_args(argv)
    device = args.device
    info = machine_info()
    print(f'device={device} {machine_line(info)}')
    results = dict(device=device, batch=args.batch, **info)
    if args.only in (None, 'layer'):
        results['layer'] = layer_rows(args, device)
    if args.only in (None, 'model'):
        results['model'] = model_rows(args, device)
    if device.startswith('cuda'):
        results['gpu'] = throughput(device, args.interpolations, 64, args.repeats,
                                    plain=not args.skip_plain)
    if args.out:
        write_json(results, args.out)
    return results


if __name__ == '__main__':
    main()
