"""Which layers of a model are DCLS layers, and which stage each belongs to."""
from __future__ import annotations

import re
from typing import List, Tuple

from torch import nn

from dcls_mm.ops import dcls_layers

_STAGE = re.compile(r'(?:^|\.)stages\.(\d+)\.')


def named_dcls_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(name, layer)`` of every DCLS layer of ``model`` in traversal order (each module
    once): :func:`dcls_mm.ops.dcls_layers`, the project's one DCLS-layer finder (so
    models converted by :func:`dcls_mm.ops.convert_to_dcls` are analysed too).

    Args:
        model: any module.
    """
    return dcls_layers(model)


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
