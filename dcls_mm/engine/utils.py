"""Helpers shared by the DCLS engine components (no OpenMMLab imports)."""
from __future__ import annotations

from typing import Iterable, Iterator, List, Optional, Tuple, Union

from torch import nn

from dcls_mm.ops.introspect import dcls_layers, dcls_position_parameters, is_dcls_layer

#: type of the ``data_batch`` argument of the hooks' ``*_train_iter`` methods
DATA_BATCH = Optional[Union[dict, tuple, list]]

#: the engine's name for :func:`dcls_mm.ops.is_dcls_layer`
is_dcls_module = is_dcls_layer


def dcls_modules(model: nn.Module) -> List[nn.Module]:
    """All DCLS layers of ``model`` (:func:`dcls_mm.ops.dcls_layers` without the names).

    Several modules may share one ``P`` parameter (ConvNeXt-dcls ``share_positions``);
    they are all returned.

    Args:
        model: the model to traverse.
    """
    return [m for _, m in dcls_layers(model)]


def position_parameters(model_or_layers: Union[nn.Module, Iterable[nn.Module]],
                        attrs: Tuple[str, ...] = ('P', 'SIG')
                        ) -> Iterator[Tuple[str, nn.Parameter]]:
    """Yield ``(attribute, parameter)`` for every distinct ``P``/``SIG`` of the DCLS
    layers (:func:`dcls_mm.ops.dcls_position_parameters` with the attribute name only);
    a parameter shared by several layers is yielded once.

    Args:
        model_or_layers: a model or an iterable of DCLS layers.
        attrs: the attributes to look at, ``('P', 'SIG')`` by default.
    """
    for name, param in dcls_position_parameters(model_or_layers, attrs):
        yield name.rsplit('.', 1)[-1], param


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
