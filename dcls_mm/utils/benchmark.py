"""Timing and peak-memory measurement for the benchmark scripts in ``tools/analysis``.

Benchmarks compare ratios measured in the same run (machines are noisy), never
absolute numbers against a threshold.
"""
from __future__ import annotations

import contextlib
import os
import re
import statistics
import sys
import tempfile
import time
from typing import Callable, Iterator, List, Sequence

import torch


def _sync(device: str) -> None:
    if str(device).startswith('cuda'):
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device: str = 'cpu', repeats: int = 5,
            warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_fns(fns: Sequence[Callable[[], object]], device: str = 'cpu', repeats: int = 5,
             warmup: int = 2) -> List[float]:
    """Median wall time (seconds) of each function, measured *interleaved* (one run of
    each per round) so that a slow phase of a noisy machine hits all of them alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    _sync(device)
    times: List[List[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            bucket.append(time.perf_counter() - t0)
    return [statistics.median(bucket) for bucket in times]


def peak_memory_mib(fn: Callable[[], object], device: str = 'cpu') -> float:
    """Peak of memory allocated by tensors during one call of ``fn()``, in MiB, relative to
    what was allocated before the call.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the PyTorch profiler's allocation
    records (each op's own allocations at its start, each free at its time), replayed
    in time order; RSS-based numbers are useless here because the high-water mark of
    importing torch hides everything smaller.
    """
    if str(device).startswith('cuda'):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch.profiler import ProfilerActivity, profile
    with _without_profiler_chatter(), \
            profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []
    for e in prof.events():
        delta = e.cpu_memory_usage if e.name == '[memory]' else e.self_cpu_memory_usage
        if delta:
            events.append((e.time_range.start, delta))
    events.sort(key=lambda t: t[0])
    current = peak = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak / 2**20


#: a line libkineto (the profiler's C++ backend) writes to stderr itself, e.g.
#: ``USDT:2026-11-30 14:59:43 22950:22950 SyncActivityProfilerHandler.cpp:52] profiler_start``
#: or ``ERROR:... DeviceProperties.cpp:50] gpuGetDeviceCount failed with code 35``.
PROFILER_CHATTER = re.compile(r'^[A-Z]+:\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \d+:\d+ [\w.]+\.cpp:\d+\] ')


@contextlib.contextmanager
def _without_profiler_chatter() -> Iterator[None]:
    """Keep libkineto's own lines off stderr while the profiler runs.

    libkineto writes them to file descriptor 2 from C++ (no Python logger or
    environment setting turns them off once torch is imported), so fd 2 is pointed at a
    temporary file for the duration and everything else written meanwhile (Python
    warnings, the measured function's own messages) is copied back to stderr after.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode='w+b') as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode(errors='replace').splitlines(True)
                    if not PROFILER_CHATTER.match(line)]
            if kept:
                sys.stderr.write(''.join(kept))
                sys.stderr.flush()


def machine_info() -> dict:
    """What CPU speed numbers depend on: CPU model, ATen's CPU capability
    (``torch.backends.cpu.get_cpu_capability()``), oneDNN's ISA cap
    (``ONEDNN_MAX_CPU_ISA``), whether the compiled kernels are built and which
    instruction-set copy of them runs, torch, threads."""
    import os

    from dcls_mm.ops import extension, routes
    return dict(cpu=routes.cpu_model(), cpu_capability=torch.backends.cpu.get_cpu_capability(),
                onednn_max_cpu_isa=os.environ.get('ONEDNN_MAX_CPU_ISA', 'default'),
                compiled_kernels=extension.available(), compiled_isa=extension.isa(),
                torch=torch.__version__, threads=torch.get_num_threads())


def machine_line(info: dict) -> str:
    """One header line of :func:`machine_info` for the benchmark scripts.

    Args:
        info: what :func:`machine_info` returned.
    """
    kernels = (f'compiled C++ kernels ({info["compiled_isa"]} copy)' if info['compiled_kernels']
               else 'PyTorch fallback (C++ kernels not built)')
    return (f'cpu="{info["cpu"]}" cpu_capability={info["cpu_capability"]} '
            f'ONEDNN_MAX_CPU_ISA={info["onednn_max_cpu_isa"]} torch={info["torch"]} '
            f'threads={info["threads"]} dcls kernels: {kernels}')


def spread_positions(model: torch.nn.Module) -> torch.nn.Module:
    """Draw every DCLS layer's positions uniformly over its dilated kernel (from the
    global generator), in place, as a stand-in for a trained model: freshly initialised
    positions sit near the centre, where a depthwise layer convolves with only the few
    taps they reach (:func:`dcls_mm.ops.kernel.support_radius`), which would make a
    benchmark of random-initialised models measure less work than trained ones do.

    Returns:
        ``model``.
    """
    from dcls_mm.ops import dcls_layers
    with torch.no_grad():
        for _, layer in dcls_layers(model):
            for d, L in enumerate(layer.dilated_kernel_size):
                layer.P[d].uniform_(-(L // 2), L // 2)
    return model


def dcls_layer_routes(module, x_shape, dtype: torch.dtype = torch.float32,
                      device: torch.device = torch.device('cpu')) -> dict:
    """Routes a ``Dcls2d`` layer used for inputs of ``x_shape`` (after it ran): ``conv``
    (the forward, measured ``direct``/``sparse``/``onednn`` on the CPU, ``triton``/``aten`` on a
    GPU; ``plain`` for a layer on the plain path) and ``kernel_grad`` (measured
    ``direct``/``sparse``/``fft`` on the CPU, ``fft``/``aten`` on
    a GPU, see :mod:`dcls_mm.ops.routes`), and ``construct``
    (``scatter``/``compiled``/``torch``).

    Args:
        module: the ``Dcls2d`` layer.
        x_shape: its input shape ``(N, C, H, W)``.
        dtype: the dtype its convolution ran in (the autocast dtype under autocast).
        device: where it ran.
    """
    from dcls_mm.ops.depthwise import conv_route, kernel_grad_route, used_taps
    from dcls_mm.ops.kernel import construction_route, has_gradient_support
    if not module.uses_fast_path:
        return dict(conv='plain', kernel_grad='plain',
                    construct=construction_route(module.interpolation, 2, module.P, module.SIG))
    # the taps the layer convolves with (a window on small maps and while its positions
    # are near the centre); only the input's shape is read
    window = module.kernel_window(torch.empty(x_shape, device='meta'))
    kernel_hw = (module.dilated_kernel_size if window is None
                 else tuple(stop - start for start, stop in window))
    padding = module.window_padding(window)
    # the sparse routes' speed depends on the kernel's share of non-zero taps (over the
    # taps that meet the input); the kernel gradient has that route with a support only
    (r0, r1, c0, c1), _ = used_taps(x_shape[-2:], kernel_hw, module.stride, padding)
    with torch.no_grad():
        kernel = module.construct_kernel(window)[..., r0:r1, c0:c1]
    density = torch.count_nonzero(kernel).item() / kernel.numel()
    support = has_gradient_support(module.P, module.interpolation)
    return dict(conv=conv_route(x_shape, kernel_hw, module.stride, padding, dtype, device,
                                density),
                kernel_grad=kernel_grad_route(x_shape, kernel_hw, module.stride, padding, dtype,
                                              device, density if support else None),
                construct=construction_route(module.interpolation, 2, module.P, module.SIG))


class DclsRouteRecorder:
    """Records each ``Dcls2d`` layer's first input (shape, dtype after autocast, device)
    while a model runs, then reports the routes each layer used (:func:`dcls_layer_routes`).

    Args:
        model: any module containing ``Dcls2d`` layers.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        from dcls_mm.ops import Dcls2d
        self.model = model
        self.inputs: dict = {}
        self._handles = []
        for name, m in model.named_modules():
            if isinstance(m, Dcls2d):
                def hook(mod, inputs, name=name):
                    x = inputs[0]
                    dtype = (torch.get_autocast_dtype(x.device.type)
                             if torch.is_autocast_enabled(x.device.type) else x.dtype)
                    self.inputs.setdefault(name, (tuple(x.shape), dtype, x.device))
                self._handles.append(m.register_forward_pre_hook(hook))

    def report(self) -> dict:
        """``{layer name: {'input': shape, 'conv': ..., 'kernel_grad': ..., 'construct':
        ...}}``; removes the hooks."""
        for handle in self._handles:
            handle.remove()
        modules = dict(self.model.named_modules())
        return {name: dict(input=list(shape), **dcls_layer_routes(modules[name], shape, dtype,
                                                                  device))
                for name, (shape, dtype, device) in self.inputs.items()}

    @staticmethod
    def summary(routes_by_layer: dict) -> str:
        """One line: layers grouped by (input shape, routes), e.g. the blocks of a stage.

        Args:
            routes_by_layer: what :meth:`report` returned.
        """
        groups: dict = {}
        for layer, info in routes_by_layer.items():
            key = (tuple(info['input']), routes_text(info))
            groups.setdefault(key, []).append(layer)
        return '; '.join(f'{len(layers)} x {"x".join(map(str, shape[1:]))}: {text}'
                         for (shape, text), layers in groups.items())


def routes_text(routes: dict) -> str:
    """``'conv ..., kernel_grad ..., construct ...'`` for what :func:`dcls_layer_routes`
    returned."""
    return (f'conv {routes["conv"]}, kernel_grad {routes["kernel_grad"]}, '
            f'construct {routes["construct"]}')


def write_json(results: dict, path: str) -> None:
    """Write a benchmark's results as indented JSON (creating the folder) and say where.

    Args:
        results: JSON-serialisable results.
        path: output file.
    """
    import json
    import os
    os.makedirs(os.path.dirname(os.path.abspath(path)) or '.', exist_ok=True)
    with open(path, 'w') as f:
        json.dump(results, f, indent=2)
    print(f'wrote {path}')
