"""Small utilities shared by tools (benchmarking)."""
from .benchmark import (DclsRouteRecorder, dcls_layer_routes, machine_info, machine_line,
                        peak_memory_mib, time_fn, time_fns, write_json)

__all__ = ['DclsRouteRecorder', 'dcls_layer_routes', 'machine_info', 'machine_line',
           'peak_memory_mib', 'time_fn', 'time_fns', 'write_json']
