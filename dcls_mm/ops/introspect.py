"""Find the DCLS layers of any model: the one place every other component asks.

The optimizer constructor, the clamp and repulsive-loss hooks, the checkpoint code, the
ConvNeXt-dcls backbone and :func:`dcls_mm.ops.set_impl` all go through
:func:`dcls_layers` / :func:`dcls_position_parameters`, so a model converted by
:func:`dcls_mm.ops.convert_to_dcls` (or holding the reference package's layers) is seen
exactly like ConvNeXt-dcls.

This module imports nothing from :mod:`dcls_mm.ops.modules` (which imports it): layers
are recognised by duck typing.
"""
from __future__ import annotations

from typing import Iterable, Iterator, List, Tuple, Union

from torch import nn

from .kernel import canonical_interpolation

#: names of the position-like parameters of a DCLS layer
POSITION_ATTRS = ('P', 'SIG')


def is_dcls_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a DCLS convolution.

    True for every layer of :data:`dcls_mm.ops.DCLS_LAYER_TYPES` (``Dcls1d/2d/3d``, the
    N_M variants) and, by duck typing, for any module with a ``clamp_parameters()`` method
    and a positions parameter ``P`` (e.g. the reference ``DCLS`` package's layers).

    Args:
        module: the module to test.
    """
    return (callable(getattr(module, 'clamp_parameters', None))
            and isinstance(getattr(module, 'P', None), nn.Parameter))


def layer_interpolation(layer: nn.Module) -> str:
    """Canonical interpolation name (:data:`dcls_mm.ops.INTERPOLATIONS`) of a DCLS layer:
    ours (``.interpolation``) or the reference package's (``.version``: ``'v0'``,
    ``'gauss'``, ...).

    Args:
        layer: a module for which :func:`is_dcls_layer` holds.
    """
    name = getattr(layer, 'interpolation', None)
    if name is None:
        name = vars(layer).get('version', 'v0')  # the reference package's default
    return canonical_interpolation(name)


def dcls_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(name, layer)`` of every DCLS layer of ``model``, in traversal order.

    A layer reachable under several names is listed once, under its first name (``''``
    when ``model`` itself is a DCLS layer). Layers that share one ``P`` (ConvNeXt-dcls
    stages, ``convert_to_dcls(share_positions=...)``) are distinct modules and are all
    listed; :func:`dcls_position_parameters` lists their shared positions once.

    Args:
        model: any module.
    """
    return [(name, m) for name, m in model.named_modules() if is_dcls_layer(m)]


def dcls_position_parameters(model_or_layers: Union[nn.Module, Iterable[nn.Module]],
                             attrs: Tuple[str, ...] = POSITION_ATTRS
                             ) -> Iterator[Tuple[str, nn.Parameter]]:
    """Yield ``(name, parameter)`` for every distinct position parameter (``P``, ``SIG``)
    of the DCLS layers; a parameter shared by several layers is yielded once, under the
    name of the first layer holding it.

    Args:
        model_or_layers: a model (its layers are found by :func:`dcls_layers`; names are
            full parameter names, e.g. ``'stages.0.0.dwconv.P'``) or an iterable of DCLS
            layers (used as given; names are ``'{index}.{attr}'``).
        attrs: the attributes to look at, ``('P', 'SIG')`` by default.
    """
    if isinstance(model_or_layers, nn.Module):
        named = dcls_layers(model_or_layers)
    else:
        named = [(str(i), m) for i, m in enumerate(model_or_layers)]
    seen = set()
    for layer_name, module in named:
        for attr in attrs:
            param = getattr(module, attr, None)
            if isinstance(param, nn.Parameter) and id(param) not in seen:
                seen.add(id(param))
                yield (f'{layer_name}.{attr}' if layer_name else attr), param
