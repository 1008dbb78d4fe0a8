"""Small utilities shared by tools (benchmarking)."""
from .benchmark import peak_memory_mib, time_fn, time_fns

__all__ = ['peak_memory_mib', 'time_fn', 'time_fns']
