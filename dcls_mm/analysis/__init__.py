"""Analysis of DCLS models: effective receptive fields, learned positions and kernels,
position dynamics over training, and model complexity.

Library functions behind ``tools/analysis/{erf,positions,position_dynamics,complexity}.py``.
This package sits above :mod:`dcls_mm.models` and :mod:`dcls_mm.engine`; nothing in
``dcls_mm`` imports it.
"""
from .complexity import (complexity_table, measure_complexity, measure_throughput)
from .dynamics import (find_checkpoints, position_speeds, read_learning_rates,
                       run_position_dynamics)
from .erf import area_ratios, compute_erf, load_erf_images, normalize_erf, run_erf
from .layers import group_name, named_dcls_layers
from .loading import build_analysis_model, build_labelled_models, parse_model_spec
from .positions import collect_positions, position_stats, run_positions

__all__ = [
    'named_dcls_layers', 'group_name', 'build_analysis_model', 'build_labelled_models',
    'parse_model_spec',
    'compute_erf', 'normalize_erf', 'area_ratios', 'load_erf_images', 'run_erf',
    'collect_positions', 'position_stats', 'run_positions', 'find_checkpoints',
    'position_speeds', 'read_learning_rates', 'run_position_dynamics', 'measure_complexity',
    'measure_throughput', 'complexity_table'
]
