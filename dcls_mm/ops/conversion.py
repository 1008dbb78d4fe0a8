"""Convert any model's convolutions to DCLS, exactly, in the spirit of timm's
``convert_sync_batchnorm``.

:func:`convert_to_dcls` replaces ``nn.Conv1d/2d/3d`` modules by :class:`Dcls1d` /
:class:`Dcls2d` / :class:`Dcls3d` with the same channels, stride, groups, bias, dtype,
device and output shapes. With ``init='exact'`` a dense ``k x k`` kernel becomes a DCLS
kernel of ``k*k`` elements placed on the integer grid (bilinear: a triangle of unit
width, so each element lands on one tap), and the converted model computes the same
outputs as the original, to float rounding: fine-tuning can start from any pretrained
dense checkpoint. The conversion *adds* the positions ``P`` (``D`` numbers per element),
so an exact model has more parameters than the dense one; ``kernel_count='iso'`` gives
the largest count with no more parameters (then the init is ``'random'``).

Geometry: the dense kernel (size ``k``, padding ``(lo, hi)``) sits at offset
``off = min(L // 2 - (k - 1) // 2, L - k)`` of the dilated kernel (size ``L``), i.e.
centred as well as the sizes allow, and the DCLS layer is padded by
``(lo + off, hi + L - k - off)``: same output size, and the dense taps read the same
inputs as before.
"""
from __future__ import annotations

import fnmatch
import logging
import math
from typing import (Callable, Dict, Hashable, List, Mapping, Optional, Sequence, Tuple,
                    Union)

import torch
from torch import Tensor, nn

from .introspect import dcls_layers
from .kernel import NORM_EPS, WITH_SIGMA, canonical_interpolation
from .modules import Dcls1d, Dcls2d, Dcls3d, _ntuple

logger = logging.getLogger(__name__)

_DENSE = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_DCLS = {1: Dcls1d, 2: Dcls2d, 3: Dcls3d}
#: interpolations that represent an element at an integer position by one tap, so that
#: ``init='exact'`` is exact (the normalised ones divide by ``1 + NORM_EPS``, which the
#: conversion multiplies back). The narrowest gaussian (width 0.27) leaks
#: ``exp(-0.5 / 0.27 ** 2) ~ 1e-3`` of every weight to the neighbouring taps.
EXACT_INTERPOLATIONS = ('bilinear', 'bilinear_normalized', 'triangle')
INITS = ('exact', 'random')

#: ``select`` / ``exclude``: a predicate ``(name, conv) -> bool`` or fnmatch patterns of
#: module names (``'layer*.conv2'``; ``*`` also matches dots).
Selector = Union[None, str, Sequence[str], Callable[[str, nn.Module], bool]]
#: ``share_positions``: fnmatch patterns (the convs matching pattern ``i`` share one set of
#: positions) or a function ``(name, conv) -> key or None`` (equal keys share).
Sharing = Union[None, str, Sequence[str], Callable[[str, nn.Module], Optional[Hashable]]]


def _matches(selector: Selector, name: str, module: nn.Module, default: bool) -> bool:
    if selector is None:
        return default
    if callable(selector):
        return bool(selector(name, module))
    patterns = [selector] if isinstance(selector, str) else list(selector)
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _share_key(sharing: Sharing, name: str, module: nn.Module) -> Optional[Hashable]:
    if sharing is None:
        return None
    if callable(sharing):
        return sharing(name, module)
    patterns = [sharing] if isinstance(sharing, str) else list(sharing)
    for i, pattern in enumerate(patterns):
        if fnmatch.fnmatchcase(name, pattern):
            return ('pattern', i)
    return None


def _unsupported(conv: nn.Module, dks: Tuple[int, ...]) -> Optional[str]:
    """Why ``conv`` cannot be converted exactly (``None`` if it can)."""
    base = next(cls for cls in _DENSE if isinstance(conv, cls))
    if isinstance(conv.weight, nn.parameter.UninitializedParameter):
        return 'lazy convolution not initialised yet (run one forward first)'
    for method in ('forward', '_conv_forward'):
        if getattr(type(conv), method) is not getattr(base, method):
            # e.g. timm's Conv2dSame (input-dependent padding) or weight standardisation:
            # a DCLS layer would silently drop that behaviour
            return (f'{type(conv).__name__} overrides {base.__name__}.{method}, '
                    'which a DCLS layer would not reproduce')
    if any(d != 1 for d in conv.dilation):
        return f'dilation {tuple(conv.dilation)} > 1 is not supported'
    if conv.padding_mode != 'zeros':
        return f"padding_mode {conv.padding_mode!r} is not supported (only 'zeros')"
    if any(k > L for k, L in zip(conv.kernel_size, dks)):
        return (f'kernel size {tuple(conv.kernel_size)} is larger than '
                f'dilated_kernel_size {dks}')
    return None


def dense_padding(conv: nn.Module) -> Tuple[Tuple[int, int], ...]:
    """Per spatial dim ``(before, after)`` zero padding of a dense conv (dilation 1).

    Args:
        conv: an ``nn.Conv1d/2d/3d``; string paddings are resolved like PyTorch does
            (``'same'`` puts the odd extra pixel after).
    """
    if conv.padding == 'valid':
        return tuple((0, 0) for _ in conv.kernel_size)
    if conv.padding == 'same':
        return tuple(((k - 1) // 2, k - 1 - (k - 1) // 2) for k in conv.kernel_size)
    return tuple((p, p) for p in conv.padding)


def kernel_offset(kernel_size: int, dilated_kernel_size: int) -> int:
    """Index of the dense kernel's first tap inside the dilated kernel (see module doc).

    Args:
        kernel_size: dense kernel size ``k`` along one dim.
        dilated_kernel_size: DCLS dilated kernel size ``L >= k`` along that dim.
    """
    L, k = dilated_kernel_size, kernel_size
    return min(L // 2 - (k - 1) // 2, L - k)


def _check_exact(interpolation: str) -> str:
    """Canonical ``interpolation``; ValueError if ``init='exact'`` cannot be exact with it."""
    interpolation = canonical_interpolation(interpolation)
    if interpolation not in EXACT_INTERPOLATIONS:
        raise ValueError(f"init='exact' needs interpolation in {EXACT_INTERPOLATIONS}, got "
                         f'{interpolation!r}: its narrowest profile (width 0.27) spreads '
                         f'{math.exp(-0.5 / 0.27 ** 2):.1e} of every weight onto each '
                         "neighbouring tap; use init='random'")
    return interpolation


def exact_dcls_parameters(dense_weight: Tensor, dilated_kernel_size: Sequence[int],
                          interpolation: str = 'bilinear') -> Tuple[Tensor, Tensor]:
    """``(weight, P)`` of the DCLS kernel equal to a dense kernel.

    Element ``t`` of a kernel is dense tap ``t`` (row-major, like
    ``dense_weight.flatten(2)``), at the integer position of that tap (centred
    coordinates, see :mod:`dcls_mm.ops.kernel`).

    Args:
        dense_weight: ``(C_out, C_in/groups, *k)``.
        dilated_kernel_size: ``L`` per spatial dim, each ``>= k``.
        interpolation: one of :data:`EXACT_INTERPOLATIONS` (normalised ones get their
            weights scaled by ``1 + NORM_EPS``, which the normalisation divides away).

    Returns:
        ``weight`` ``(C_out, C_in/groups, prod(k))`` and ``P`` ``(D, C_out, C_in/groups,
        prod(k))``, in the dtype and on the device of ``dense_weight``.
    """
    interpolation = _check_exact(interpolation)
    ks = tuple(dense_weight.shape[2:])
    dks = tuple(dilated_kernel_size)
    if len(ks) != len(dks) or any(k > L for k, L in zip(ks, dks)):
        raise ValueError(f'dense kernel size {ks} does not fit dilated_kernel_size {dks}')
    axes = [torch.arange(k, dtype=dense_weight.dtype, device=dense_weight.device)
            + (kernel_offset(k, L) - L // 2) for k, L in zip(ks, dks)]
    coords = torch.stack([g.flatten() for g in torch.meshgrid(*axes, indexing='ij')])
    weight = dense_weight.flatten(2).clone()
    if interpolation != 'bilinear':
        weight = weight * (1 + NORM_EPS)
    P = coords.view(len(ks), 1, 1, -1).expand(-1, *weight.shape).clone()
    return weight, P


def iso_count(kernel_size: Sequence[int], n_layers: int = 1, interpolation: str = 'bilinear',
              name: str = '') -> int:
    """Largest ``kernel_count`` whose DCLS layers have no more parameters than the dense
    ones they replace.

    Per (output, input) channel pair, ``n_layers`` dense layers hold ``n * prod(k)``
    weights; DCLS layers ``n * K`` weights plus ``D * K`` positions (``2 * D * K`` with
    ``SIG``) shared by the ``n`` layers (``n = 1``: not shared). Biases are the same.

    Args:
        kernel_size: dense kernel size per spatial dim (``D = len(kernel_size)``).
        n_layers: number of layers sharing one set of positions.
        interpolation: DCLS interpolation (triangle/gaussian add ``SIG``).
        name: layer name for the error message.

    Returns:
        ``floor(n * prod(k) / (n + D * (2 if SIG else 1)))``.
    """
    per_element = len(kernel_size) * (2 if canonical_interpolation(interpolation) in WITH_SIGMA
                                      else 1)
    count = n_layers * math.prod(kernel_size) // (n_layers + per_element)
    if count < 1:
        raise ValueError(f"kernel_count='iso': no kernel_count >= 1 keeps {name or 'the layer'} "
                         f'(kernel size {tuple(kernel_size)}, {n_layers} layer(s) sharing '
                         'positions) at or below its dense parameter count')
    return count


def _find_convs(model: nn.Module) -> Dict[int, Tuple[str, nn.Module, List[Tuple[nn.Module, str]]]]:
    """``id -> (first name, conv, [(parent, attribute), ...])`` of every dense conv."""
    found: Dict[int, Tuple[str, nn.Module, List[Tuple[nn.Module, str]]]] = {}
    if isinstance(model, tuple(_DENSE)):
        found[id(model)] = ('', model, [])
    for parent_name, parent in model.named_modules():
        for attr, child in parent._modules.items():
            if child is None or not isinstance(child, tuple(_DENSE)):
                continue
            name = f'{parent_name}.{attr}' if parent_name else attr
            entry = found.setdefault(id(child), (name, child, []))
            entry[2].append((parent, attr))
    return found


def convert_to_dcls(model: nn.Module, *, dilated_kernel_size: Union[int, Sequence[int]],
                    kernel_count: Union[None, str, int] = None,
                    interpolation: str = 'bilinear', select: Selector = None,
                    exclude: Selector = None, init: str = 'exact',
                    share_positions: Sharing = None,
                    skip_unsupported: bool = False) -> nn.Module:
    """Replace ``nn.Conv1d/2d/3d`` modules of ``model`` by DCLS layers, in place.

    Each converted layer keeps the conv's channels, stride, groups, bias, dtype, device,
    ``requires_grad`` and train/eval mode, and its output shape (the padding grows with
    the dilated kernel, see the module doc). It gets the attribute
    ``source_kernel_size`` (the dense kernel size), used by
    :func:`convert_dense_state_dict`. Forward hooks of the replaced convs are not moved.

    Args:
        model: the model (a conv itself is allowed: the new layer is returned).
        dilated_kernel_size: ``L``, an int or one per spatial dim; every converted kernel
            must fit (``k <= L``).
        kernel_count: ``None``: one element per dense tap (``prod(k)``, the only value
            ``init='exact'`` accepts); ``'iso'``: the largest count keeping each layer (or
            each group of layers sharing positions) at or below its dense parameter count
            (:func:`iso_count`); an int: that count everywhere.
        interpolation: DCLS interpolation (``'bilinear'`` is the published one).
        select: which convs to convert: a predicate ``(name, conv) -> bool`` or fnmatch
            patterns of module names. Default: every conv with more than one tap (1x1
            convs have no spacing to learn).
        exclude: convs to leave dense (same forms as ``select``; e.g. ``'conv1'`` for
            the stem of a ResNet).
        init: ``'exact'``: the DCLS kernel equals the dense one (elements on the integer
            grid, dense weights and bias copied); ``'random'``: the DCLS layers' own init
            (kaiming-uniform weights, N(0, 0.5) positions), nothing copied.
        share_positions: ``None`` (no sharing); fnmatch patterns: the converted convs
            matching pattern ``i`` share one ``P`` (and ``SIG``) Parameter, as the
            ConvNeXt-dcls stages (e.g. ``['layer1.*', 'layer2.*', ...]`` for one set per
            ResNet stage); or a function ``(name, conv) -> key`` (``None``: not shared).
            Convs sharing positions must have the same channels, groups and kernel size.
        skip_unsupported: leave selected convs that cannot be converted (dilation > 1,
            a padding mode other than zeros, a kernel larger than the dilated kernel, a
            subclass with its own forward) dense, with one warning line naming them,
            instead of raising.

    Returns:
        ``model`` (or the new layer if ``model`` is itself a conv).

    Raises:
        ValueError: bad arguments or an unsupported conv (one line naming it and why).
    """
    if init not in INITS:
        raise ValueError(f'init must be one of {INITS}, got {init!r}')
    interpolation = canonical_interpolation(interpolation)
    if not (kernel_count is None or kernel_count == 'iso'
            or (isinstance(kernel_count, int) and not isinstance(kernel_count, bool)
                and kernel_count >= 1)):
        raise ValueError("kernel_count must be None, 'iso' or a positive int, "
                         f'got {kernel_count!r}')
    if init == 'exact':
        if kernel_count is not None:
            raise ValueError(f"init='exact' needs kernel_count=None (one element per dense tap), "
                             f"got {kernel_count!r}; use init='random' with 'iso' or an int")
        _check_exact(interpolation)

    plan, skipped = [], []
    for name, conv, sites in _find_convs(model).values():
        if not _matches(select, name, conv, default=math.prod(conv.kernel_size) > 1):
            continue
        if exclude is not None and _matches(exclude, name, conv, default=False):
            continue
        dks = _ntuple(dilated_kernel_size, len(conv.kernel_size), 'dilated_kernel_size', 1)
        reason = _unsupported(conv, dks)
        if reason is not None:
            if not skip_unsupported:
                raise ValueError(f'cannot convert {name or type(conv).__name__} '
                                 f'({type(conv).__name__}): {reason}')
            skipped.append(f'{name} ({reason})')
            continue
        plan.append((name, conv, sites, dks, _share_key(share_positions, name, conv)))
    if skipped:
        logger.warning('convert_to_dcls: left %d conv(s) dense: %s', len(skipped),
                       '; '.join(skipped))

    groups: Dict[Hashable, List[int]] = {}
    for i, (_, _, _, _, key) in enumerate(plan):
        groups.setdefault(key if key is not None else ('own', i), []).append(i)
    counts: Dict[int, int] = {}
    for members in groups.values():
        first_name, first = plan[members[0]][0], plan[members[0]][1]
        signature = (type(first), first.out_channels, first.in_channels // first.groups,
                     tuple(first.kernel_size), plan[members[0]][3])
        for i in members[1:]:
            name, conv = plan[i][0], plan[i][1]
            if (type(conv), conv.out_channels, conv.in_channels // conv.groups,
                    tuple(conv.kernel_size), plan[i][3]) != signature:
                raise ValueError(
                    f'share_positions: {name} (out {conv.out_channels}, in/groups '
                    f'{conv.in_channels // conv.groups}, kernel {tuple(conv.kernel_size)}) '
                    f'cannot share positions with {first_name} (out {first.out_channels}, '
                    f'in/groups {first.in_channels // first.groups}, kernel '
                    f'{tuple(first.kernel_size)})')
        if kernel_count is None:
            count = math.prod(first.kernel_size)
        elif kernel_count == 'iso':
            count = iso_count(first.kernel_size, len(members), interpolation, first_name)
        else:
            count = kernel_count
        for i in members:
            counts[i] = count

    replaced: Dict[int, nn.Module] = {}
    for members in groups.values():
        shared = None
        for i in members:
            name, conv, sites, dks, _ = plan[i]
            layer = _build_layer(conv, dks, counts[i], interpolation, init)
            if shared is None:
                shared = layer
            else:
                layer.P = shared.P
                if shared.SIG is not None:
                    layer.SIG = shared.SIG
            for parent, attr in sites:
                parent._modules[attr] = layer
            replaced[id(conv)] = layer
    if id(model) in replaced:
        return replaced[id(model)]
    return model


def _build_layer(conv: nn.Module, dks: Tuple[int, ...], count: int, interpolation: str,
                 init: str) -> nn.Module:
    """One DCLS layer replacing ``conv`` (see :func:`convert_to_dcls`)."""
    dims = len(conv.kernel_size)
    layer = _DCLS[dims](conv.in_channels, conv.out_channels, count, stride=tuple(conv.stride),
                        padding=0, dilated_kernel_size=dks, groups=conv.groups,
                        bias=conv.bias is not None, interpolation=interpolation)
    # Per-side paddings are not a constructor argument; the resolved attribute holds them.
    layer.padding = tuple((lo + kernel_offset(k, L), hi + L - k - kernel_offset(k, L))
                          for (lo, hi), k, L in zip(dense_padding(conv), conv.kernel_size, dks))
    layer.source_kernel_size = tuple(conv.kernel_size)
    layer.to(device=conv.weight.device, dtype=conv.weight.dtype)
    if init == 'exact':
        weight, P = exact_dcls_parameters(conv.weight.detach(), dks, interpolation)
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.P.copy_(P)
            if layer.bias is not None:
                layer.bias.copy_(conv.bias.detach())
    for param in (layer.weight, layer.P, layer.SIG):
        if param is not None:
            param.requires_grad_(conv.weight.requires_grad)
    if layer.bias is not None:
        layer.bias.requires_grad_(conv.bias.requires_grad)
    layer.train(conv.training)
    return layer


def convert_dense_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor]
                             ) -> Dict[str, Tensor]:
    """Map a dense (pre-conversion) state dict onto a model converted by
    :func:`convert_to_dcls`, exactly: every converted layer whose ``{name}.weight`` in
    ``state_dict`` is a dense kernel (no ``{name}.P`` entry) gets ``weight`` and ``P``
    from :func:`exact_dcls_parameters` (and ``SIG = 0`` for triangle). Other entries,
    DCLS ones included, are returned unchanged, so one function loads dense and DCLS
    checkpoints alike.

    Args:
        model: the converted model (names are relative to it).
        state_dict: the checkpoint's state dict, with the model's names.

    Returns:
        A new dict, ready for ``model.load_state_dict``.

    Raises:
        ValueError: a dense kernel whose shape is not the converted conv's, or a layer
            whose ``kernel_count`` is not one element per tap (``kernel_count=None``).
    """
    out = dict(state_dict)
    for name, layer in dcls_layers(model):
        source = getattr(layer, 'source_kernel_size', None)
        prefix = f'{name}.' if name else ''
        key = prefix + 'weight'
        if source is None or key not in out or prefix + 'P' in out:
            continue
        dense = out[key]
        expected = (layer.out_channels, layer.in_channels // layer.groups, *source)
        if tuple(dense.shape) != expected:
            raise ValueError(f'{key}: dense kernel of shape {tuple(dense.shape)} does not '
                             f'match the converted conv {expected}')
        if layer.kernel_count != math.prod(source):
            raise ValueError(f'{key}: a dense kernel initialises a DCLS layer exactly only '
                             f'with one element per tap ({math.prod(source)}), this layer '
                             f'has kernel_count={layer.kernel_count}; convert with '
                             "kernel_count=None or load a DCLS checkpoint")
        weight, P = exact_dcls_parameters(dense, layer.dilated_kernel_size, layer.interpolation)
        out[key], out[prefix + 'P'] = weight, P
        if layer.SIG is not None:
            out[prefix + 'SIG'] = torch.zeros_like(P)
    return out
