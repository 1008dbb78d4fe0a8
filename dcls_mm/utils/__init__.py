"""Small utilities shared by the package and the tools: safe checkpoint reading
(:mod:`~dcls_mm.utils.checkpoint_io`), atomic writes (:mod:`~dcls_mm.utils.fileio`) and
benchmarking (:mod:`~dcls_mm.utils.benchmark`)."""
from .benchmark import (DclsRouteRecorder, dcls_layer_routes, machine_info, machine_line,
                        peak_memory_mib, time_fn, time_fns, write_json)
from .checkpoint_io import (CheckpointReadError, UnsafeCheckpointError, load_checkpoint_file,
                            register_checkpoint_loader)

__all__ = ['DclsRouteRecorder', 'dcls_layer_routes', 'machine_info', 'machine_line',
           'peak_memory_mib', 'time_fn', 'time_fns', 'write_json', 'CheckpointReadError',
           'UnsafeCheckpointError', 'load_checkpoint_file', 'register_checkpoint_loader']
