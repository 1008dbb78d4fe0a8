"""Speed of dcls_mm's corruptions vs imagecorruptions 1.1.2: ms/image per corruption.

Times ``dcls_mm.datasets.corruptions.corrupt`` for every corruption at all 5 severities
on 224x224 images (ms/image: per severity the fastest call over the images and
repeats, which a loaded shared machine disturbs least, averaged over severities; after
one warm-up call per corruption) and prints the CPU capability. The reference cannot run in the
dcls-mm environment (NumPy 2, scikit-image >= 0.20); give the Python of a side
environment with ``--reference-python`` to time it in the same run, on the same
images, alternating with dcls_mm corruption by corruption (the reference runs in a
helper process that waits for each name), and print the ratio reference / dcls_mm per
corruption and for all 19 x 5 together.
``--compare`` also checks the numbers: every corruption of dcls_mm against the
reference on the same images, the reference's random draws replayed from dcls_mm's
generator (max |difference| of the uint8 outputs; see ``corruptions_reference.py``).

Side environment (only for this check; its pins are those that still run the
reference, with a one-keyword patch for scikit-image's gaussian):

    python3 -m venv /tmp/icref
    /tmp/icref/bin/pip install "numpy<2" scikit-image==0.24.0 "scipy<1.14" \\
        "opencv-python-headless<4.11" "setuptools<82" pillow
    /tmp/icref/bin/pip install --no-deps imagecorruptions==1.1.2

    python tools/analysis/benchmark_corruptions.py                       # dcls_mm only
    python tools/analysis/benchmark_corruptions.py --reference-python /tmp/icref/bin/python --compare
"""
from __future__ import annotations

import argparse
import json
import os
import os.path as osp
import subprocess
import sys
import tempfile
import time

import cv2
import numpy as np
import torch

from dcls_mm.datasets import corruptions as dc

HELPER = osp.join(osp.dirname(osp.abspath(__file__)), 'corruptions_reference.py')


def test_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """``n`` photo-like ``size`` x ``size`` RGB images: smooth colour fields with
    texture and edges (blur/JPEG/glass costs depend little on content)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    images = []
    for _ in range(n):
        base = np.stack([np.sin(2 * np.pi * (rng.uniform(0.5, 3) * xx + rng.uniform()))
                         * np.cos(2 * np.pi * rng.uniform(0.5, 3) * yy) for _ in range(3)], 2)
        texture = cv2.GaussianBlur(rng.normal(size=(size, size, 3)), (0, 0), 1.5)
        img = 127.5 + 90 * base + 60 * texture
        img[size // 3: size // 2, size // 4: 3 * size // 4] *= 0.5  # an edge-bounded box
        images.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(images)


def time_ours(images: np.ndarray, name: str, repeats: int) -> float:
    """ms per image of dcls_mm's ``corrupt``: for each severity the fastest call over
    images x repeats (the least disturbed by other load on a shared machine), averaged
    over severities; after a warm-up call that loads the frost textures. The reference
    is timed the same way (``corruptions_reference.time_reference``)."""
    dc.corrupt(images[0], name, 1, seed=0)
    best = []
    for severity in range(1, 6):
        calls = []
        for r in range(repeats):
            for i, img in enumerate(images):
                t0 = time.perf_counter()
                dc.corrupt(img, name, severity, seed=r * 1000 + i)
                calls.append(time.perf_counter() - t0)
        best.append(min(calls))
    return 1000 * sum(best) / len(best)


def time_both(images: np.ndarray, names, repeats: int, python: str = '',
              npy: str = '') -> tuple:
    """ms/image per corruption of dcls_mm and (with ``python``) of the reference, timed
    alternately corruption by corruption, so that both see the same machine load."""
    ours, ref = {}, {}
    server = None
    if python:
        server = subprocess.Popen([python, HELPER, 'serve', npy, '--repeats', str(repeats)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        for name in names:
            ours[name] = time_ours(images, name, repeats)
            if server:
                server.stdin.write(name + '\n')
                server.stdin.flush()
                answer = server.stdout.readline()
                if not answer:
                    raise SystemExit('benchmark_corruptions.py: the reference run failed; is '
                                     'the side environment set up as the docstring says?')
                ref[name] = json.loads(answer)
            print(f'  {name:18s} dcls_mm {ours[name]:8.1f} ms'
                  + (f'  reference {ref[name]:8.1f} ms' if server else ''),
                  file=sys.stderr, flush=True)
    finally:
        if server:
            server.stdin.close()
            server.wait()
    return ours, ref


def save_ours(images: np.ndarray, names, folder: str) -> None:
    """dcls_mm's outputs for the comparison: ``folder/<name>.npy`` of shape
    (images, 5, H, W, 3), image i at severity s + 1 seeded with ``1000 * i + s`` (the
    helper's ``compare_seed``)."""
    for name in names:
        np.save(osp.join(folder, f'{name}.npy'), np.stack([
            np.stack([dc.corrupt(img, name, s + 1, seed=1000 * i + s) for s in range(5)])
            for i, img in enumerate(images)]))


def run_compare(python: str, npy: str, names, ours_dir: str) -> dict:
    cmd = [python, HELPER, 'compare', npy, '--names', *names, '--ours', ours_dir]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f'benchmark_corruptions.py: the reference run failed ({" ".join(cmd)}); '
                         'is the side environment set up as the docstring says?')
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--images', type=int, default=3, help='test images (default 3)')
    parser.add_argument('--size', type=int, default=224, help='image side (default 224)')
    parser.add_argument('--repeats', type=int, default=1, help='passes over the images')
    parser.add_argument('--corruptions', nargs='+', default=dc.corruption_names('all'),
                        help='names (default: all 19)')
    parser.add_argument('--reference-python',
                        help='Python of a side env with imagecorruptions 1.1.2 (see docstring)')
    parser.add_argument('--compare', action='store_true',
                        help='with --reference-python: also compare outputs (max |diff|)')
    parser.add_argument('--out', help='also write the numbers as JSON here')
    args = parser.parse_args(argv)
    for name in args.corruptions:
        if name not in dc.CORRUPTION_SUBSETS['all']:
            parser.error(f'unknown corruption {name!r}')

    images = test_images(args.images, args.size)
    capability = torch.backends.cpu.get_cpu_capability()
    print(f'CPU capability: {capability}; {os.cpu_count()} logical CPUs; '
          f'{args.images} images {args.size}x{args.size}, severities 1..5', flush=True)
    result = dict(cpu_capability=capability, images=args.images, size=args.size,
                  repeats=args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        npy = osp.join(tmp, 'images.npy')
        np.save(npy, images)
        result['ours_ms'], ref_ms = time_both(images, args.corruptions, args.repeats,
                                              args.reference_python or '', npy)
        if ref_ms:
            result['reference_ms'] = ref_ms
        if args.reference_python and args.compare:
            save_ours(images, args.corruptions, tmp)
            compared = run_compare(args.reference_python, npy, args.corruptions, tmp)
            result['compare'] = compared['result']
            result['reference_versions'] = compared['versions']

    ours, ref_ms = result['ours_ms'], result.get('reference_ms')
    header = f'{"corruption":18s} {"dcls_mm ms":>11s}'
    if ref_ms:
        header += f' {"reference ms":>13s} {"ratio":>7s}'
    if 'compare' in result:
        header += f' {"max|diff|":>9s}'
    print(header)
    for name in args.corruptions:
        line = f'{name:18s} {ours[name]:11.1f}'
        if ref_ms:
            line += f' {ref_ms[name]:13.1f} {ref_ms[name] / ours[name]:7.1f}'
        if 'compare' in result:
            line += f' {result["compare"][name]["max_abs_diff"]:9d}'
        print(line)
    # per-corruption numbers are per image and severity; the total is per image for
    # every listed corruption at all 5 severities
    total = 5 * sum(ours.values())
    result['ours_total_ms'] = total
    line = f'{"all x 5 severities":18s} {total:11.1f}'
    if ref_ms:
        ref_total = 5 * sum(ref_ms[n] for n in args.corruptions)
        result['reference_total_ms'] = ref_total
        result['ratio_total'] = ref_total / total
        line += f' {ref_total:13.1f} {ref_total / total:7.1f}'
    print(line)
    if ref_ms:
        print(f'ratio reference / dcls_mm, all corruptions x severities: '
              f'{result["ratio_total"]:.1f}x (CPU capability {capability})')
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == '__main__':
    main()
