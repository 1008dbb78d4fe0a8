"""Helpers shared by the DCLS engine components (no OpenMMLab imports)."""
from __future__ import annotations

from typing import Iterator, List, Tuple

from torch import nn

from dcls_mm.ops.modules import _DclsNd


def is_dcls_module(module: nn.Module) -> bool:
    """Whether ``module`` is a DCLS convolution.

    True for :class:`dcls_mm.ops.modules._DclsNd` subclasses and, by duck typing, for
    any module with a ``clamp_parameters()`` method and a positions parameter ``P``
    (e.g. the reference ``DCLS`` package's layers).

    Args:
        module: the module to test.
    """
    if isinstance(module, _DclsNd):
        return True
    return (callable(getattr(module, 'clamp_parameters', None))
            and isinstance(getattr(module, 'P', None), nn.Parameter))


def dcls_modules(model: nn.Module) -> List[nn.Module]:
    """All DCLS convolutions of ``model`` (each module once, in traversal order).

    Several modules may share one ``P`` parameter (ConvNeXt-dcls ``share_positions``);
    they are all returned.

    Args:
        model: the model to traverse.
    """
    return [m for m in model.modules() if is_dcls_module(m)]


def position_parameters(model: nn.Module) -> Iterator[Tuple[str, nn.Parameter]]:
    """Yield ``(attribute, parameter)`` for every distinct ``P``/``SIG`` of the DCLS
    layers of ``model``; a parameter shared by several layers is yielded once.

    Args:
        model: the model to traverse.
    """
    seen = set()
    for module in dcls_modules(model):
        for attr in ('P', 'SIG'):
            param = getattr(module, attr, None)
            if isinstance(param, nn.Parameter) and id(param) not in seen:
                seen.add(id(param))
                yield attr, param


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip a distributed/data-parallel wrapper (anything with ``.module``).

    Args:
        model: a model, possibly wrapped by ``DistributedDataParallel``,
            ``MMDistributedDataParallel`` and the like.
    """
    try:
        from mmengine.model import is_model_wrapper
    except ImportError:  # pragma: no cover - mmengine is a dependency
        is_model_wrapper = None
    while True:
        if is_model_wrapper is not None and is_model_wrapper(model):
            model = model.module
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model
