"""Helpers shared by the DCLS engine components (no OpenMMLab imports)."""
from __future__ import annotations

from typing import Iterable, Iterator, List, Optional, Tuple, Union

from torch import nn

from dcls_mm.ops.modules import _DclsNd

#: type of the ``data_batch`` argument of the hooks' ``*_train_iter`` methods
DATA_BATCH = Optional[Union[dict, tuple, list]]


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


def position_parameters(model_or_layers: Union[nn.Module, Iterable[nn.Module]],
                        attrs: Tuple[str, ...] = ('P', 'SIG')
                        ) -> Iterator[Tuple[str, nn.Parameter]]:
    """Yield ``(attribute, parameter)`` for every distinct ``P``/``SIG`` of the DCLS
    layers of a model; a parameter shared by several layers is yielded once.

    Args:
        model_or_layers: a model (its DCLS layers are found by :func:`dcls_modules`)
            or an iterable of DCLS layers (used as given).
        attrs: the attributes to look at, ``('P', 'SIG')`` by default.
    """
    if isinstance(model_or_layers, nn.Module):
        layers = dcls_modules(model_or_layers)
    else:
        layers = list(model_or_layers)
    seen = set()
    for module in layers:
        for attr in attrs:
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
