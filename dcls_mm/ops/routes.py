"""Per-shape choice between exact implementations, measured once (like cuDNN's benchmark mode).

Some operations of :mod:`dcls_mm.ops` have several exact implementations whose relative
speed depends on the shape *and* on the machine (instruction set, cache sizes, thread
count); a cost-model constant tuned on one machine picks the wrong one on another. So
the first time a shape is met, every candidate runs on the real inputs and the fastest
wins; the choice is kept for the process (a shape keeps its first decision there, even if
the thread count changes) and on disk, keyed by the CPU model, ATen's CPU capability,
the compiled kernels' instruction-set copy, the thread count and the torch version (on a
GPU: its name, the CUDA, cuDNN and torch versions; timings wait for the GPU), so later
processes on the same machine skip the measurement. The candidates
compute the same values (up to float rounding), so the choice never changes results
beyond that.

Environment:

- ``DCLS_MM_ROUTES``: force routes, e.g. ``kernel_grad=fft`` or
  ``kernel_grad=direct,construct=torch`` (tests, comparisons). A forced route that is
  not available for a call (e.g. ``direct`` without the compiled kernels, or for
  float64) falls back to measuring among the available ones (one warning per op and
  route: it may be a typo).
- ``DCLS_MM_ROUTE_CACHE``: path of the JSON cache file (default
  ``~/.cache/dcls-mm/routes.json``, ``$XDG_CACHE_HOME`` honoured); ``0`` or empty: no
  disk cache (measure once per process).
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch

from dcls_mm.utils.fileio import atomic_open

try:
    import fcntl
except ImportError:  # not POSIX: no lock between processes
    fcntl = None

ENV_FORCE = 'DCLS_MM_ROUTES'
ENV_CACHE = 'DCLS_MM_ROUTE_CACHE'
#: timed runs per candidate after one warm-up run (the minimum counts). With 2, a noisy
#: moment on a 2-core machine once made oneDNN look as slow as the direct forward at a
#: shape where it is 1.3x faster; the measurement runs once per shape and machine.
TIMED_RUNS = 5

_lock = threading.Lock()
_memory: Dict[str, Dict[str, dict]] = {}  # machine key -> {op|shape: entry}
_loaded_from: Dict[str, bool] = {}       # cache path -> loaded
_used: Dict[tuple, str] = {}             # (op|shape, device) -> route as reported (forced...)
_decided: Dict[tuple, str] = {}          # (op|shape, device) -> route measured or cached
_unavailable_warned: set = set()         # (op, forced route) warned about
_CPU = torch.device('cpu')


def forced(op: str) -> Optional[str]:
    """Route forced for ``op`` by ``DCLS_MM_ROUTES`` (``None``: not forced).

    Args:
        op: operation name, e.g. ``'kernel_grad'``.

    Raises:
        ValueError: for a malformed ``DCLS_MM_ROUTES`` item.
    """
    spec = os.environ.get(ENV_FORCE, '').strip()
    if not spec:
        return None
    routes = {}
    for item in spec.split(','):  # every item checked, whichever op is asked for
        name, sep, route = item.strip().partition('=')
        if not sep or not name.strip() or not route.strip():
            raise ValueError(f'{ENV_FORCE} must look like "op=route[,op=route]", got {spec!r}')
        routes.setdefault(name.strip(), route.strip())
    return routes.get(op)


def cache_path() -> Optional[Path]:
    """The disk cache file, or ``None`` when disabled by ``DCLS_MM_ROUTE_CACHE``."""
    value = os.environ.get(ENV_CACHE)
    if value is not None:
        return None if value.strip() in ('', '0') else Path(value)
    cache = os.environ.get('XDG_CACHE_HOME') or os.path.join(Path.home(), '.cache')
    return Path(cache) / 'dcls-mm' / 'routes.json'


@functools.lru_cache(maxsize=None)
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; elsewhere what :mod:`platform` knows)."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key(device: Optional[torch.device] = None) -> str:
    """What a measurement depends on besides the shape: on the CPU the CPU model, ATen's
    CPU capability, the compiled kernels' instruction-set copy, oneDNN's ISA cap, threads
    and torch; on a GPU its name, CUDA, cuDNN and torch versions.

    Args:
        device: where the measured operation runs (``None``: the CPU).
    """
    if device is not None and device.type == 'cuda':
        return ' | '.join((torch.cuda.get_device_name(device), f'cuda {torch.version.cuda}',
                           f'cudnn {torch.backends.cudnn.version()}', f'torch {torch.__version__}'))
    from . import extension  # the copy in use is known once the library is loaded
    return ' | '.join((
        cpu_model(), f'capability {torch.backends.cpu.get_cpu_capability()}',
        f'ext {extension.isa()}', f'onednn {os.environ.get("ONEDNN_MAX_CPU_ISA", "default")}',
        f'threads {torch.get_num_threads()}', f'torch {torch.__version__}'))


def _read(path: Path, warn: bool = True) -> Dict[str, Dict[str, dict]]:
    """The cache file's content; ``{}`` when missing or unreadable (with one warning
    when ``warn``)."""
    try:
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict) or not all(
                isinstance(v, dict) and all(isinstance(e, dict) and isinstance(e.get('route'), str)
                                            for e in v.values()) for v in data.values()):
            raise ValueError('not a {machine: {shape: {"route": ...}}} mapping')
        return data
    except FileNotFoundError:
        return {}
    # json.JSONDecodeError is a ValueError; deeply nested junk raises RecursionError
    except (OSError, ValueError, RecursionError) as err:
        if not warn:
            return {}
        warnings.warn(f'dcls_mm: ignoring the unreadable route cache {path} '
                      f'({type(err).__name__}: {err}); routes will be measured again',
                      RuntimeWarning, stacklevel=3)
        return {}


@contextlib.contextmanager
def _file_lock(path: Path):
    """Holds an exclusive lock on ``path`` + ``.lock`` between processes (POSIX; elsewhere
    nothing): processes measuring at once, e.g. the ranks of a distributed job on one
    machine, each read-merge-write the cache file, and without it the last rename lost
    the others' entries (198 of 300 kept in a two-process test)."""
    if fcntl is None:
        yield
        return
    with open(f'{path}.lock', 'a') as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write(path: Path, machine: str, key: str, entry: dict) -> None:
    """Merge one entry into the file under a lock: read, update, write a temp file,
    rename (atomic, so concurrent readers never see a half-written file)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(path):
            # an unreadable file was reported when it was loaded: start it afresh
            data = _read(path, warn=False)
            data.setdefault(machine, {})[key] = entry
            with atomic_open(path, 'w') as f:
                json.dump(data, f, indent=1, sort_keys=True)
    except OSError as err:  # a read-only home must not break training
        warnings.warn(f'dcls_mm: could not write the route cache {path} ({err})',
                      RuntimeWarning, stacklevel=3)


def _known(machine: str, key: str) -> Optional[dict]:
    path = cache_path()
    if path is not None and not _loaded_from.get(str(path)):
        _loaded_from[str(path)] = True
        for m, entries in _read(path).items():
            _memory.setdefault(m, {}).update(entries)
    return _memory.get(machine, {}).get(key)


def measure(candidates: Mapping[str, Callable[[], object]],
            device: Optional[torch.device] = None) -> Tuple[str, Dict[str, float], object]:
    """Run every candidate once to warm up, then ``TIMED_RUNS`` times interleaved.

    Args:
        candidates: route name -> zero-argument function computing the result.
        device: where they run; on CUDA each timing waits for the GPU (kernels are
            asynchronous, the wall clock alone would time their launches).

    Returns:
        ``(fastest route, {route: best seconds}, the fastest route's result)``.
    """
    def sync():
        if device is not None and device.type == 'cuda':
            torch.cuda.synchronize(device)

    results = {name: fn() for name, fn in candidates.items()}
    best = {name: float('inf') for name in candidates}
    for _ in range(TIMED_RUNS):
        for name, fn in candidates.items():
            sync()
            t0 = time.perf_counter()
            results[name] = fn()
            sync()
            best[name] = min(best[name], time.perf_counter() - t0)
    route = min(best, key=best.get)
    return route, best, results[route]


def run(op: str, shape_key: str, candidates: Mapping[str, Callable[[], object]],
        device: Optional[torch.device] = None):
    """Compute ``op`` by the route chosen for this shape on this machine.

    Args:
        op: operation name (``DCLS_MM_ROUTES`` refers to it).
        shape_key: everything about the inputs the speed depends on (shapes, dtype,
            geometry), as a string.
        candidates: available routes, name -> zero-argument function computing the
            result; only the available ones may be passed.
        device: where the inputs are (``None``: the CPU); a GPU's choices are keyed and
            timed as that GPU's.

    Returns:
        The chosen route's result.
    """
    return choose(op, shape_key, candidates, device)[1]


def choose(op: str, shape_key: str, candidates: Mapping[str, Callable[[], object]],
           device: Optional[torch.device] = None) -> Tuple[str, object]:
    """Like :func:`run`, and also the name of the route that computed the result (for a
    caller that keeps the route for later calls with the same shape)."""
    key = f'{op} {shape_key}'
    device = _CPU if device is None else device
    route = _decided.get((key, device))
    if route is not None and route in candidates and ENV_FORCE not in os.environ:
        # decided earlier in this process: this runs once per layer call, so it must not
        # read the cache file, /proc/cpuinfo or the GPU's properties again
        return route, candidates[route]()
    force = forced(op)
    if force in candidates:
        _used[key, device] = f'{force} (forced)'
        return force, candidates[force]()
    if force is not None and (op, force) not in _unavailable_warned:
        _unavailable_warned.add((op, force))  # once: a typo, or a route this call lacks
        warnings.warn(f'dcls_mm: {ENV_FORCE} forces {op}={force}, which is not available '
                      f'here (available: {", ".join(candidates)}); choosing among those',
                      RuntimeWarning, stacklevel=3)
    if len(candidates) == 1:
        route = next(iter(candidates))
        _used[key, device] = f'{route} (only one available)'
        return route, candidates[route]()
    machine = machine_key(device)
    with _lock:
        entry = _known(machine, key)
    if entry is not None and entry['route'] in candidates:
        _used[key, device] = _decided[key, device] = entry['route']
        return entry['route'], candidates[entry['route']]()
    route, times, result = measure(candidates, device)
    _used[key, device] = _decided[key, device] = route
    entry = dict(route=route, seconds={k: round(v, 6) for k, v in times.items()})
    with _lock:
        _memory.setdefault(machine, {})[key] = entry
        path = cache_path()
        if path is not None:
            _write(path, machine, key, entry)
    return route, result


def _device_key(device) -> torch.device:
    """A device as tensors report it (``'cuda'`` means the current CUDA device)."""
    device = _CPU if device is None else torch.device(device)
    if device.type == 'cuda' and device.index is None:
        device = torch.device('cuda', torch.cuda.current_device())
    return device


def chosen(op: str, shape_key: str, device: Optional[torch.device] = None) -> Optional[str]:
    """The route this process used for ``op`` on ``shape_key`` on ``device`` (``None``:
    the CPU): measured, read from the cache, ``'... (forced)'`` or
    ``'... (only one available)'``; ``None`` when that shape has not run there yet. For the
    benchmark reports."""
    return _used.get((f'{op} {shape_key}', _device_key(device)))


def decisions(device: Optional[torch.device] = None) -> Dict[str, str]:
    """``{op shape: route}`` for every shape that ran on ``device`` (``None``: the CPU)
    in this process."""
    device = _device_key(device)
    return {key: route for (key, dev), route in _used.items() if dev == device}
