"""Which layers of a model are DCLS layers, and which stage each belongs to."""
from __future__ import annotations

import re
from typing import List, Tuple

from torch import nn

from dcls_mm.engine.utils import is_dcls_module

_STAGE = re.compile(r'(?:^|\.)stages\.(\d+)\.')


def named_dcls_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(name, layer)`` of every DCLS layer of ``model`` in traversal order (each module
    once). The one place the analysis tools look for DCLS layers.

    Args:
        model: any module.
    """
    return [(name, m) for name, m in model.named_modules() if is_dcls_module(m)]


def group_name(name: str) -> str:
    """The group a layer or parameter name is reported under: ``'stage{i}'`` for names
    containing ``stages.{i}.`` (ConvNeXt-dcls backbones, timm classifiers, downstream
    models' ``backbone.stages.{i}.``), else the name itself (one group per layer).

    Args:
        name: a module name (``'stages.2.5.dwconv'``) or a parameter name
            (``'backbone.stages.2.5.dwconv.P'``).
    """
    match = _STAGE.search(name + '.')
    return f'stage{match.group(1)}' if match else name
