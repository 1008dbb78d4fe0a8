"""Small utilities shared by the package and the tools: safe checkpoint reading
(:mod:`~dcls_mm.utils.checkpoint_io`), atomic writes (:mod:`~dcls_mm.utils.fileio`) and
benchmarking (:mod:`~dcls_mm.utils.benchmark`).

The names below are loaded on first use: :mod:`dcls_mm.ops` needs only
:mod:`~dcls_mm.utils.fileio`, and importing it must not pull in the checkpoint or
benchmark helpers (ops imports nothing but torch and NumPy).
"""
import importlib

_EXPORTS = {
    'benchmark': ('DclsRouteRecorder', 'dcls_layer_routes', 'machine_info', 'machine_line',
                  'peak_memory_mib', 'routes_text', 'spread_positions', 'time_fn', 'time_fns',
                  'write_json'),
    'checkpoint_io': ('CheckpointReadError', 'UnsafeCheckpointError', 'load_checkpoint_file',
                      'register_checkpoint_loader'),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    value = getattr(importlib.import_module(f'.{_WHERE[name]}', __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
