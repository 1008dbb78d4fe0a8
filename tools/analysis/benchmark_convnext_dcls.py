"""Speed and memory of DCLS depthwise layers and ConvNeXt-T-dcls against ConvNeXt-T.

Every number is a ratio against a baseline measured in the same run (median of
repeats after warm-up), because machines are noisy:

- layer: DCLS depthwise ``Dcls2d`` (dks 17, K 34) forward+backward at the four
  ConvNeXt-T stage shapes (batch 8, 224 input: C 96/192/384/768 at 56/28/14/7), fast and
  plain paths, against ``nn.Conv2d`` 7x7 depthwise on the same input (NCHW and
  channels_last inputs);
- model: ConvNeXt-T-dcls (timm ``convnext_dcls_tiny``, dks 17, K 34) training step
  (forward + backward) and inference against timm ``convnext_tiny``, and the peak
  memory of the training step; on CUDA, throughput in images/s with AMP (batch 64).

Targets (issue "fast DCLS depthwise convolution"): layer <= 1.5x, training step <= 1.2x,
inference <= 1.1x, training peak memory <= 1.1x; on CUDA throughput >= 0.95x.

Example::

    python tools/analysis/benchmark_convnext_dcls.py --out work_dirs/bench_convnext_dcls.json
"""
from __future__ import annotations

import argparse
import json
import os

import timm
import torch
import torch.nn as nn

import dcls_mm.models  # noqa: F401  (registers convnext_dcls_* in timm)
from dcls_mm.ops import Dcls2d, extension, set_impl
from dcls_mm.utils import peak_memory_mib, time_fn, time_fns

STAGES = ((96, 56), (192, 28), (384, 14), (768, 7))


def layer_rows(args, device):
    rows = []
    print(f'\n[layer] fwd+bwd, batch {args.batch}, dks 17, K 34 (ms; ratio vs 7x7 on the same input)')
    print(f'{"C":>4} {"HxW":>6} {"input":>13} {"7x7":>8} {"dcls":>8} {"ratio":>6} {"plain":>9} {"ratio":>7}')
    for C, H in STAGES:
        for layout in ('nchw', 'channels_last'):
            x = torch.randn(args.batch, C, H, H, device=device)
            if layout == 'channels_last':
                x = x.contiguous(memory_format=torch.channels_last)
            x.requires_grad_(True)
            dcls = Dcls2d(C, C, 34, padding='same', dilated_kernel_size=17, groups=C,
                          version='bilinear').to(device)
            dense = nn.Conv2d(C, C, 7, padding=3, groups=C).to(device)

            def step(m):
                def run():
                    y = m(x)
                    y.backward(torch.ones_like(y))
                return run
            row = dict(C=C, H=H, layout=layout)
            dense_s, dcls_s = time_fns([step(dense), step(dcls)], device, args.repeats)
            row['dense7_ms'], row['dcls_ms'] = 1e3 * dense_s, 1e3 * dcls_s
            if not args.skip_plain:
                dcls.impl = 'plain'
                row['plain_ms'] = 1e3 * time_fn(step(dcls), device, max(1, args.repeats // 2), 1)
            rows.append(row)
            plain = (f'{row["plain_ms"]:9.1f} {row["plain_ms"] / row["dense7_ms"]:6.1f}x'
                     if 'plain_ms' in row else '')
            print(f'{C:4d} {H:3d}x{H:<3d}{layout:>13} {row["dense7_ms"]:8.1f} {row["dcls_ms"]:8.1f} '
                  f'{row["dcls_ms"] / row["dense7_ms"]:5.2f}x {plain}', flush=True)
    return rows


def model_rows(args, device):
    torch.manual_seed(0)
    models = {'convnext_tiny': timm.create_model('convnext_tiny').to(device),
              'convnext_dcls_tiny': timm.create_model('convnext_dcls_tiny').to(device)}
    x = torch.randn(args.batch, 3, 224, 224, device=device)
    target = torch.randint(0, 1000, (args.batch,), device=device)
    loss_fn = nn.CrossEntropyLoss()
    result = {}
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
    train_s = time_fns([train_step(models[n]) for n in names], device, args.repeats)
    infer_s = time_fns([infer(models[n]) for n in names], device, args.repeats)
    for name, t_train, t_infer in zip(names, train_s, infer_s):
        model = models[name]
        entry = dict(train_ms=1e3 * t_train, infer_ms=1e3 * t_infer)
        entry['train_peak_mib'] = peak_memory_mib(train_step(model), device)
        model.zero_grad(set_to_none=True)
        result[name] = entry
    if not args.skip_plain:
        dcls = models['convnext_dcls_tiny']
        set_impl(dcls, 'plain')

        result['convnext_dcls_tiny_plain'] = dict(
            train_ms=1e3 * time_fn(train_step(dcls), device, 1, 0))
        set_impl(dcls, 'auto')
    base, ours = result['convnext_tiny'], result['convnext_dcls_tiny']
    ratios = dict(train=ours['train_ms'] / base['train_ms'],
                  infer=ours['infer_ms'] / base['infer_ms'],
                  memory=ours['train_peak_mib'] / base['train_peak_mib'])
    print(f'{"model":28} {"train ms":>10} {"infer ms":>10} {"train peak MiB":>15}')
    for name, e in result.items():
        print(f'{name:28} {e["train_ms"]:10.1f} {e.get("infer_ms", float("nan")):10.1f} '
              f'{e.get("train_peak_mib", float("nan")):15.1f}')
    print(f'ratios dcls/dense: train {ratios["train"]:.2f}x (target <= 1.2), '
          f'inference {ratios["infer"]:.2f}x (target <= 1.1), '
          f'peak memory {ratios["memory"]:.2f}x (target <= 1.1)')
    return dict(models=result, ratios=ratios)


def throughput(device: str, batch: int = 64, repeats: int = 5, plain: bool = False) -> dict:
    """images/s of an AdamW training step with AMP (bf16 autocast) at ``batch``; run on
    CUDA by :func:`main` (batch 64), callable on any device. ``plain`` adds ConvNeXt-T-dcls
    on the plain path, to see what the fast path gains on that device."""
    out = {}
    variants = [('convnext_tiny', 'auto'), ('convnext_dcls_tiny', 'auto')]
    if plain:
        variants.append(('convnext_dcls_tiny', 'plain'))
    for name, impl in variants:
        model = timm.create_model(name).to(device).to(memory_format=torch.channels_last)
        set_impl(model, impl)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randn(batch, 3, 224, 224, device=device).contiguous(
            memory_format=torch.channels_last)
        target = torch.randint(0, 1000, (batch,), device=device)

        def step():
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(model(x), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        out[name if impl == 'auto' else f'{name}_plain'] = batch / time_fn(step, device, repeats, 3)
    ratio = out['convnext_dcls_tiny'] / out['convnext_tiny']
    print(f'\n[throughput] training, AMP bf16, batch {batch} (img/s): '
          + ', '.join(f'{k} {v:.1f}' for k, v in out.items())
          + f'; ratio dcls/dense {ratio:.3f} (target on GPU >= 0.95)')
    return dict(batch=batch, images_per_s=out, ratio=ratio)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--skip-plain', action='store_true',
                        help='skip the (slow on CPU) plain-path numbers')
    parser.add_argument('--only', choices=['layer', 'model'], help='run one part only')
    parser.add_argument('--out', help='write results as JSON to this file')
    args = parser.parse_args(argv)
    device = args.device
    compiled = extension.available()
    print(f'device={device} torch={torch.__version__} threads={torch.get_num_threads()} '
          f'kernel gradient on CPU: '
          f'{"compiled C++ kernels" if compiled else "PyTorch FFT fallback (C++ kernels not built)"}')
    results = dict(device=device, torch=torch.__version__, threads=torch.get_num_threads(),
                   batch=args.batch, compiled_kernels=compiled)
    if args.only in (None, 'layer'):
        results['layer'] = layer_rows(args, device)
    if args.only in (None, 'model'):
        results['model'] = model_rows(args, device)
    if device.startswith('cuda'):
        results['gpu'] = throughput(device, 64, args.repeats, plain=not args.skip_plain)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)) or '.', exist_ok=True)
        with open(args.out, 'w') as f:
            json.dump(results, f, indent=2)
        print(f'wrote {args.out}')
    return results


if __name__ == '__main__':
    main()
