"""Is data loading the bottleneck of tools/robustness/evaluate.py? Tool vs bare forward.

Generates an ImageNet-C-layout set (224x224 JPEGs, ``--sets`` severities of one
corruption) and measures, in the same run and on the same device with the same batch
size, model, memory format and AMP setting:

- tool: images/s of the evaluation loop of ``run_evaluation`` (the tool's own code:
  worker decoding, batching, normalisation, forward, counting, records), DataLoader
  start-up included;
- bare: images/s of the model's forward alone on the same images, decoded and normalised
  in advance (preloaded tensors).

It prints ratio = tool / bare (goal >= 0.85 on a 2-core CPU with ConvNeXt-T-dcls) and
the CPU capability. Rounds alternate tool and bare runs; medians are reported.

    python tools/analysis/benchmark_robustness.py                       # CPU, ConvNeXt-T-dcls
    python tools/analysis/benchmark_robustness.py --device cuda --amp --images 2048 --batch-size 128
"""
from __future__ import annotations

from dcls_mm.utils.console import ignore_known_warnings

ignore_known_warnings()  # before mmengine imports pkg_resources

import argparse
import json
import os
import os.path as osp
import shutil
import statistics
import tempfile
import time

import torch

from dcls_mm.datasets.imagenet_layouts import synthetic_images, write_corruption_folders
from dcls_mm.evaluation.classification import (EvalConfig, build_classifier, discover_sets,
                                               resolve_preprocessing, run_evaluation,
                                               read_image)
from dcls_mm.evaluation.folders import imagenet_wnids


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', default='convnext_dcls_tiny')
    parser.add_argument('--images', type=int, default=96, help='images in the generated set')
    parser.add_argument('--sets', type=int, default=2, help='severity folders (sets)')
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--workers', type=int, default=None,
                        help="DataLoader workers (default: the tool's, min(4, CPUs - 1))")
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--amp', action='store_true')
    parser.add_argument('--rounds', type=int, default=2, help='tool/bare measurement rounds')
    parser.add_argument('--out', help='also write the numbers as JSON here')
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    workers = args.workers if args.workers is not None else max(0, min(4, (os.cpu_count() or 1) - 1))
    device = torch.device(args.device)
    tmp = tempfile.mkdtemp(prefix='bench_robustness_')
    wnids = imagenet_wnids()[::100][:10]
    per_class = -(-args.images // (len(wnids) * args.sets))
    samples = synthetic_images(wnids, per_class, size=224, seed=0)
    per_set = len(samples)
    write_corruption_folders(osp.join(tmp, 'imagenet-c'), samples, ['gaussian_noise'],
                             severities=list(range(1, args.sets + 1)))
    total = per_set * args.sets
    print(f'set: {tmp}/imagenet-c, {args.sets} sets x {per_set} images (224x224 JPEG)')

    model, _ = build_classifier(args.model)
    model.to(device).to(memory_format=torch.channels_last)
    prep = resolve_preprocessing(model)['native']
    sets = discover_sets(['imagenet-c'], tmp, {})
    mean = torch.tensor(prep['mean']).view(1, 3, 1, 1) * 255
    std = torch.tensor(prep['std']).view(1, 3, 1, 1) * 255
    images = torch.stack([read_image(p, None) for s in sets for p, _ in s.items])
    batches = [((images[i:i + args.batch_size].float() - mean) / std).to(device).contiguous(
        memory_format=torch.channels_last) for i in range(0, len(images), args.batch_size)]
    amp_dtype = torch.float16 if device.type == 'cuda' else torch.bfloat16

    def bare() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode(), torch.autocast(device.type, amp_dtype, enabled=args.amp):
            for x in batches:
                model(x).float().argmax(1)
        if device.type == 'cuda':
            torch.cuda.synchronize()
        return len(images) / (time.perf_counter() - t0)

    def tool(round_: int) -> float:
        cfg = EvalConfig(model=args.model, benchmarks=['imagenet-c'], data_root=tmp,
                         out_dir=osp.join(tmp, f'out{round_}'), batch_size=args.batch_size,
                         workers=workers, device=args.device, amp=args.amp, progress=False)
        out = run_evaluation(cfg)
        assert out['eval_images'] == total
        return out['eval_images'] / out['eval_seconds']

    bare()  # warm-up: kernel construction caches, allocator
    tool_ips, bare_ips = [], []
    for r in range(args.rounds):
        tool_ips.append(tool(r))
        bare_ips.append(bare())
        print(f'round {r + 1}: tool {tool_ips[-1]:.2f} img/s, bare forward '
              f'{bare_ips[-1]:.2f} img/s')
    result = {
        'model': args.model, 'device': args.device, 'amp': args.amp,
        'cpu_capability': torch.backends.cpu.get_cpu_capability(),
        'torch_threads': torch.get_num_threads(), 'cpus': os.cpu_count(),
        'workers': workers, 'batch_size': args.batch_size, 'images': total,
        'tool_images_per_s': statistics.median(tool_ips),
        'bare_images_per_s': statistics.median(bare_ips),
    }
    result['ratio'] = result['tool_images_per_s'] / result['bare_images_per_s']
    if device.type == 'cuda':
        result['gpu'] = torch.cuda.get_device_name()
    print(f"{args.model} on {args.device}{' (AMP)' if args.amp else ''}, channels_last, batch "
          f"{args.batch_size}, {workers} workers, {os.cpu_count()} CPUs, CPU capability "
          f"{result['cpu_capability']}: tool {result['tool_images_per_s']:.2f} img/s vs bare "
          f"forward {result['bare_images_per_s']:.2f} img/s -> ratio {result['ratio']:.3f} "
          '(goal >= 0.85)')
    shutil.rmtree(tmp, ignore_errors=True)
    if args.out:
        os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
        with open(args.out, 'w') as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == '__main__':
    main()
