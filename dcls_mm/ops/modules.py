"""DCLS convolution modules (drop-in for the reference package ``DCLS.construct.modules``).

Parameters are named and shaped exactly like the reference package, so its state dicts
load unchanged (mind the axis convention of ``'v1'``/``'max'``/``'gauss'`` state dicts:
see :mod:`dcls_mm.ops.convert`). All modules share :class:`_DclsNd`; they only differ by
how many spatial dims the convolution has, which of them carry learned positions, and
how the constructed kernel is laid onto the convolution's kernel shape.

The interpolation is chosen by ``interpolation=`` (the name the models use too); the
reference package's ``version=`` is accepted as a deprecated alias, so ported code runs
unchanged (with a ``DeprecationWarning``).
"""
from __future__ import annotations

import functools
import inspect
import math
import os
import textwrap
import warnings
from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn import init

from . import routes
from .depthwise import depthwise_conv2d, depthwise_conv2d_plan, tracing, used_taps
from .introspect import dcls_layers
from .kernel import (SIGMA_INIT, WITH_SIGMA, Window, canonical_interpolation, construct_kernel,
                     gradient_support, has_gradient_support, support_radius)

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
PADDING_MODES = ('zeros', 'reflect', 'replicate', 'circular')
IMPLS = ('auto', 'plain')
IntOrTuple = Union[int, Sequence[int]]
#: Argument documentation shared by the public layers; each class's ``Args:`` section is
#: generated from its own ``__init__`` signature (:func:`_document_args`), as torch
#: formats the shared notes into ``Conv1d/2d/3d.__doc__``.
_ARG_DOCS = {
    'in_channels': 'input channels ``C_in``.',
    'out_channels': 'output channels ``C_out``.',
    'kernel_count': 'number ``K`` of learned elements per (output, input) channel pair{per}.',
    'stride': 'convolution stride: an int or one per conv dim. Defaults to 1.',
    'padding': "an int, one per conv dim, ``'same'`` (stride 1 only; even kernels are "
               "padded asymmetrically like ``torch.nn.Conv2d``) or ``'valid'``. Defaults "
               'to 0.',
    'dense_kernel_size': 'sizes of the dense (not learned) leading kernel dims: an int or '
                         'one per dense dim. Defaults to 1.',
    'dilated_kernel_size': 'size ``L`` of the learned kernel dims (positions are kept in '
                           '``[-(L // 2), L // 2]``): an int or one per learned dim. '
                           'Defaults to 1.',
    'groups': 'blocked connections; ``C_in`` and ``C_out`` must be divisible by it. '
              'Defaults to 1.',
    'bias': 'add a learnable bias ``(C_out,)``. Defaults to True.',
    'padding_mode': "``'zeros'``, ``'reflect'``, ``'replicate'`` or ``'circular'``. "
                    "Defaults to ``'zeros'``.",
    'interpolation': "how elements spread onto the grid: ``'bilinear'`` (``'v0'``), "
                     "``'bilinear_normalized'`` (``'v1'``), ``'triangle'`` (``'max'``) or "
                     "``'gaussian'`` (``'gauss'``); the last two learn a width ``SIG``. "
                     'Defaults to ``{default!r}``.',
    'impl': "``'auto'`` runs depthwise layers (``groups == in_channels == out_channels``, "
            'zero padding) through :func:`dcls_mm.ops.depthwise_conv2d`, exact and much '
            'faster on the CPU for large kernels (its output is channels_last); '
            "``'plain'`` always constructs the kernel and calls ``F.conv2d`` (the "
            'reference path, for comparisons). Can be changed later by setting the '
            "attribute, e.g. with :func:`dcls_mm.ops.set_impl`. Defaults to ``'auto'``.",
    'flat_dim': "``0`` lays the 1-D kernel along height, ``1`` along width. Defaults to 0.",
    'version': 'deprecated alias of ``interpolation`` (the reference package\'s name); '
               'given, it wins and a ``DeprecationWarning`` is issued.',
}


def _document_args(cls: type) -> type:
    """Fill the ``{args}`` field of ``cls.__doc__`` with one Google-style line per
    argument of ``cls.__init__``, in signature order (so a new argument cannot go
    undocumented: :data:`_ARG_DOCS` raises ``KeyError`` at import)."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    per = ' (per dense tap)' if 'dense_kernel_size' in [p.name for p in params] else ''
    lines = []
    for p in params:
        text = _ARG_DOCS[p.name].format(per=per, default=p.default)
        lines.append(textwrap.fill(f'{p.name}: {text}', width=88, initial_indent=' ' * 8,
                                   subsequent_indent=' ' * 12))
    cls.__doc__ = cls.__doc__.format(args='\n'.join(lines))
    return cls


def _caller_stacklevel() -> int:
    """The ``warnings.warn`` stacklevel, called from this module, that names the first
    line outside it (the user's ``Dcls2d(...)``, however many constructors it crossed)."""
    frame, level = inspect.currentframe().f_back, 1
    while frame is not None and frame.f_globals.get('__name__') == __name__:
        frame, level = frame.f_back, level + 1
    return level


def _ntuple(value, n: int, name: str, minimum: int) -> Tuple[int, ...]:
    """Expand ``value`` to an ``n``-tuple of ints ``>= minimum``; ValueError naming ``name``."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f'{name} must be an int or a tuple of {n} ints, got {value!r}')
        values = tuple(value)
    else:
        values = (value,) * n
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise ValueError(f'{name} must contain ints >= {minimum}, got {value!r}')
    return values


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: Tensor) -> np.ndarray:
    """The bits of a CPU tensor's values, as a flat NumPy integer array (a view when
    ``t`` is contiguous)."""
    return t.detach().reshape(-1).view(_INT_OF_SIZE[t.element_size()]).numpy()


def _same_values(saved: Sequence[Tensor], params: Sequence[Tensor]) -> bool:
    """Whether the CPU tensors ``params`` hold bit for bit the values (and dtype, shape)
    of ``saved``.

    NumPy compares on one thread: ``torch.equal`` goes parallel above 32k elements, and
    its OpenMP start-up costs milliseconds on a busy machine (measured 12 ms vs 0.1 ms
    for a ``(2, 768, 1, 34)`` position tensor at load 9 on 2 cores).

    Args:
        saved: copies taken when a kernel was built.
        params: the module's current parameters, in the same order.
    """
    return len(saved) == len(params) and all(
        a.dtype == b.dtype and a.device == b.device and a.shape == b.shape
        and np.array_equal(_bits(a), _bits(b)) for a, b in zip(saved, params))


#: input shapes whose forward plan a layer's inference memo keeps (bounded: detectors
#: see a new size with nearly every image; the kernels, per window, are few anyway)
_FORWARD_PLANS = 64


class _InferenceMemo:
    """What a layer derives from its parameters without autograd, kept while they hold
    the same values (:meth:`_DclsNd._inference_memo`).

    Attributes:
        spec: what else the kernel depends on (interpolation, dilated kernel size).
        params: copies of the parameters when the memo was made.
        kernels: window -> kernel built by :meth:`_DclsNd.construct_kernel`.
        forward: an input's key (its :meth:`_DclsNd._window_key`, shape, dtype, ...)
            -> (window, kernel, convolution from :meth:`_DclsNd._conv_plan`) of the
            layer's forward.
    """

    __slots__ = ('spec', 'params', 'kernels', 'forward')

    def __init__(self, spec: tuple, params: Sequence[Tensor]) -> None:
        self.spec = spec
        # copies: a version counter misses `.data` updates, the values cannot
        self.params = [p.detach().clone() for p in params]
        self.kernels: dict = {}
        self.forward: dict = {}


def _dcls_forward(module: '_DclsNd', x: Tensor) -> Tensor:
    """A DCLS layer's forward (see :meth:`_DclsNd.forward`).

    Args:
        module: the layer.
        x: its input.
    """
    module._check_input(x)
    memo = module._inference_memo()
    if memo is None:
        window = module.kernel_window(x)
        kernel = module.construct_kernel(window)
        return module.conv(x, kernel, window, module.construction_support(kernel, window))
    # inference: the window, the kernel and the convolution's route depend only on the
    # parameters' values and on this key; finding them again took 0.1-0.3 ms a layer call
    key = (module._window_key(x), x.shape, x.dtype, torch.is_autocast_enabled(x.device.type),
           os.environ.get(routes.ENV_FORCE), None if module.bias is None else module.bias.dtype)
    plan = memo.forward.get(key)
    if plan is None:
        if len(memo.forward) >= _FORWARD_PLANS:  # e.g. detection: a size per image
            memo.forward.clear()
        window = module.kernel_window(x)
        kernel = module.construct_kernel(window)
        y, conv = module._conv_plan(x, kernel, window)
        memo.forward[key] = (window, kernel, conv)
        return y
    window, kernel, conv = plan
    # the bias at call time (not in the memo's values; a copied module has its own)
    return module.conv(x, kernel, window) if conv is None else conv(x, module.bias)


# torch.fx (torchvision's create_feature_extractor, timm's FeatureGraphNet) records the
# call as one node: the input checks and the fast path's choices depend on shapes,
# which symbolic tracing cannot branch on.
torch.fx.wrap('_dcls_forward')


class _DclsNd(nn.Module):
    """Base class of all DCLS convolutions (not meant to be used directly).

    Args:
        in_channels, out_channels, kernel_count, stride, padding, dilated_kernel_size,
            groups, bias, padding_mode, interpolation, version: as documented by each
            public layer (e.g. :class:`Dcls2d`).
        conv_dims: spatial dims of the convolution (set by subclasses).
        learned_dims: number ``D`` of kernel dims with learned positions (set by subclasses).
        dense_kernel_size: sizes of the dense (not learned) leading kernel dims (N_M
            variants only, ``None`` otherwise).

    Attributes:
        weight: ``(C_out, C_in/groups, *dense_kernel_size, K)``.
        P: positions ``(D, C_out, C_in/groups, *dense_kernel_size, K)``, ``D`` learned dims,
            centred: kept in ``[-(L_d // 2), L_d // 2]`` by :meth:`clamp_parameters`.
        SIG: like ``P``, only for triangle/gaussian (otherwise ``None``).
        bias: ``(C_out,)`` or ``None``.
    """

    #: positions initialised from N(0, 0.5) (``False``: uniform over the range).
    _normal_position_init = True

    def __init__(self, in_channels: int, out_channels: int, kernel_count: int,
                 stride: IntOrTuple, padding: Union[IntOrTuple, str],
                 dilated_kernel_size: IntOrTuple, groups: int, bias: bool, padding_mode: str,
                 interpolation: str, conv_dims: int, learned_dims: int,
                 dense_kernel_size: Optional[IntOrTuple] = None,
                 version: Optional[str] = None) -> None:
        super().__init__()
        arg_name = 'interpolation'
        if version is not None:
            warnings.warn(f"{type(self).__name__}(version=...) is deprecated: use "
                          "interpolation=... (same values, 'v0'/'gauss'/... included)",
                          DeprecationWarning, stacklevel=_caller_stacklevel())
            interpolation, arg_name = version, 'version'
        for name, value in (('in_channels', in_channels), ('out_channels', out_channels),
                            ('kernel_count', kernel_count), ('groups', groups)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f'{name} must be a positive int, got {value!r}')
        if in_channels % groups or out_channels % groups:
            raise ValueError(f'in_channels ({in_channels}) and out_channels ({out_channels}) '
                             f'must be divisible by groups ({groups})')
        if padding_mode not in PADDING_MODES:
            raise ValueError(f'padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}')
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_count = kernel_count
        self.groups = groups
        self.padding_mode = padding_mode
        self.interpolation = canonical_interpolation(interpolation, arg_name)
        self.conv_dims = conv_dims
        self.stride = _ntuple(stride, conv_dims, 'stride', 1)
        self.dilated_kernel_size = _ntuple(dilated_kernel_size, learned_dims,
                                           'dilated_kernel_size', 1)
        # Dense leading dims exist only for the N_M variants (Dcls2dK1d has a 1-D kernel
        # that is laid onto a 2-D convolution instead).
        n_dense = conv_dims - learned_dims if dense_kernel_size is not None else 0
        self.dense_kernel_size = _ntuple(dense_kernel_size, n_dense, 'dense_kernel_size', 1)
        self.padding = self._resolve_padding(padding)

        shape = (out_channels, in_channels // groups, *self.dense_kernel_size, kernel_count)
        self.weight = nn.Parameter(torch.empty(shape))
        self.P = nn.Parameter(torch.empty(learned_dims, *shape))
        if self.interpolation in WITH_SIGMA:
            self.SIG = nn.Parameter(torch.empty(learned_dims, *shape))
        else:
            self.register_parameter('SIG', None)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter('bias', None)
        # Non-persistent: they follow .to()/.cuda() but stay out of state dicts.
        for d, size in enumerate(self.dilated_kernel_size):
            self.register_buffer(f'grid{d}', torch.arange(size, dtype=torch.float32),
                                 persistent=False)
        self.reset_parameters()

    @property
    def version(self) -> str:
        """Deprecated alias of :attr:`interpolation` (the reference package's name)."""
        warnings.warn('DCLS layer attribute .version is deprecated: use .interpolation',
                      DeprecationWarning, stacklevel=2)
        return self.interpolation

    @version.setter
    def version(self, value: str) -> None:
        warnings.warn('DCLS layer attribute .version is deprecated: use .interpolation',
                      DeprecationWarning, stacklevel=2)
        self.interpolation = canonical_interpolation(value, 'version')

    def __setstate__(self, state: dict) -> None:
        # whole modules pickled before the rename hold 'version' in their __dict__
        if 'version' in state:
            state['interpolation'] = state.pop('version')
        super().__setstate__(state)

    # --- geometry -------------------------------------------------------------------
    @property
    def kernel_size(self) -> Tuple[int, ...]:
        """Shape of the convolution kernel's spatial dims."""
        return (*self.dense_kernel_size, *self.dilated_kernel_size)

    def _resolve_padding(self, padding) -> Tuple[Tuple[int, int], ...]:
        """Per conv dim ``(before, after)`` padding."""
        ks = self.kernel_size
        if isinstance(padding, str):
            if padding == 'valid':
                return tuple((0, 0) for _ in ks)
            if padding != 'same':
                raise ValueError(f"padding must be an int, a tuple, 'same' or 'valid', got {padding!r}")
            if any(s != 1 for s in self.stride):
                raise ValueError("padding='same' requires stride 1 (as in torch.nn.Conv2d), "
                                 f'got stride={self.stride}')
            return tuple(((k - 1) // 2, k - 1 - (k - 1) // 2) for k in ks)
        return tuple((p, p) for p in _ntuple(padding, self.conv_dims, 'padding', 0))

    # --- parameters -----------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Re-initialise like the reference package: kaiming-uniform weights, positions
        from N(0, 0.5) (uniform over the range for the N_M variants) clamped to the
        dilated kernel, SIG 0.23 (gaussian) or 0 (triangle)."""
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in, _ = init._calculate_fan_in_and_fan_out(self.weight)
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            init.uniform_(self.bias, -bound, bound)
        with torch.no_grad():
            for d, size in enumerate(self.dilated_kernel_size):
                lim = size // 2
                if self._normal_position_init:
                    init.normal_(self.P[d], 0.0, 0.5)
                else:
                    init.uniform_(self.P[d], -lim, lim)
            self.clamp_parameters()
            if self.SIG is not None:
                init.constant_(self.SIG, SIGMA_INIT[self.interpolation])

    @torch.no_grad()
    def clamp_parameters(self) -> None:
        """Clamp positions in place to ``[-(L_d // 2), L_d // 2]`` along each learned dim."""
        for d, size in enumerate(self.dilated_kernel_size):
            self.P[d].clamp_(-(size // 2), size // 2)

    # --- kernel and convolution -----------------------------------------------------
    def construct_kernel(self, window: Optional[Window] = None) -> Tensor:
        """Dense kernel laid out for ``F.conv{N}d``: ``(C_out, C_in/groups, *kernel_size)``.

        Built in float32 (float64 for a float64 module) with autocast disabled, then cast
        to the parameters' dtype: the interpolation of positions is precision-sensitive,
        so it never runs in bf16/fp16, whether the module was cast (``.bfloat16()``) or
        runs under autocast; the convolution that follows is autocast as usual.

        Without autograd (inference, on the CPU) the kernel is reused while the parameters
        hold the same values as when it was built (compared bit for bit, so updates
        through ``.data``, e.g. an EMA / mean-teacher model, are seen too) and the
        interpolation is the same; so are the forward's window and kernel per input
        shape. What this method returns is then a copy, free to change.

        Args:
            window: optional ``((start, stop), ...)`` per learned dim: only those taps
                (see :func:`dcls_mm.ops.construct_kernel`; :meth:`kernel_window` says
                which taps an input meets).
        """
        memo = self._inference_memo()
        if window is not None:
            window = tuple(tuple(int(i) for i in w) for w in window)  # a dict key
        if memo is not None and window in memo.kernels:
            # a copy: the caller may change it in place, the memo's must stay as built
            return memo.kernels[window].clone()
        dtype = self.weight.dtype
        build_dtype = dtype if dtype == torch.float64 else torch.float32
        device_type = self.weight.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            grids = [getattr(self, f'grid{d}') for d in range(len(self.dilated_kernel_size))]
            weight, P, SIG = (None if p is None else p.to(build_dtype)
                              for p in (self.weight, self.P, self.SIG))
            kernel = construct_kernel(weight, P, SIG, self.dilated_kernel_size, self.interpolation,
                                      grids, window).to(dtype)
        if memo is not None:
            memo.kernels[window] = kernel
            return kernel.clone()
        return kernel

    def _inference_memo(self) -> Optional[_InferenceMemo]:
        """The memo of what was built from the parameters' current values, a new one when
        they changed; ``None`` with autograd, off the CPU (comparing values on a GPU would
        synchronise the device at every layer, and building there is cheap and
        asynchronous anyway) and while tracing (``torch.compile`` traces the
        construction instead)."""
        if torch.is_grad_enabled() or self.weight.device.type != 'cpu' or tracing():
            return None
        spec = (self.interpolation, tuple(self.dilated_kernel_size))
        params = [p for p in (self.weight, self.P, self.SIG) if p is not None]
        memo = self.__dict__.get('_inference_memo_')
        if memo is None or memo.spec != spec or not _same_values(memo.params, params):
            memo = self.__dict__['_inference_memo_'] = _InferenceMemo(spec, params)
        return memo

    def _window_key(self, x: Tensor) -> tuple:
        """Everything besides the parameters' values that :meth:`kernel_window` of input
        ``x`` depends on."""
        return tuple(x.shape[-self.conv_dims:])

    def _conv_plan(self, x: Tensor, kernel: Tensor,
                   window: Optional[Window]) -> Tuple[Tensor, Optional[Callable]]:
        """Without autograd: :meth:`conv` of ``x`` and a function ``f(x, bias)`` computing
        it again for inputs of ``x``'s shape and dtype (``None``: call :meth:`conv`)."""
        return self.conv(x, kernel, window), None

    def _check_input(self, x: Tensor) -> None:
        n = self.conv_dims
        if x.dim() not in (n + 1, n + 2):
            raise ValueError(f'{type(self).__name__} expects a {n + 2}-D (batched) or {n + 1}-D '
                             f'input, got shape {tuple(x.shape)}')
        if x.shape[-n - 1] != self.in_channels:
            raise ValueError(f'{type(self).__name__} expects {self.in_channels} input channels, '
                             f'got shape {tuple(x.shape)}')
        if 0 in x.shape[-n:]:
            raise ValueError(f'{type(self).__name__} got an input with an empty spatial dim, '
                             f'shape {tuple(x.shape)}')
        # One behaviour on both paths, as torch.nn.Conv2d: no silent casts outside autocast
        # (under autocast both paths convolve in the autocast dtype).
        if x.dtype != self.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f'{type(self).__name__}: input dtype {x.dtype} does not match the '
                            f'parameters\' dtype {self.weight.dtype}; cast the input or the '
                            'module, or run under torch.autocast')
        for size, (lo, hi), k, s in zip(x.shape[-n:], self.padding, self.kernel_size, self.stride):
            if self.padding_mode == 'reflect' and max(lo, hi) >= size:
                raise ValueError(f"padding_mode='reflect' needs padding < input size; "
                                 f'padding {(lo, hi)} for input shape {tuple(x.shape)}')
            if self.padding_mode == 'circular' and max(lo, hi) > size:
                raise ValueError(f"padding_mode='circular' needs padding <= input size; "
                                 f'padding {(lo, hi)} for input shape {tuple(x.shape)}')
            if size + lo + hi < k:
                raise ValueError(f'input shape {tuple(x.shape)} is too small for kernel size '
                                 f'{self.kernel_size} with padding {self.padding}')

    def kernel_window(self, x: Tensor) -> Optional[Window]:
        """The taps of the learned kernel that input ``x`` meets, when that is fewer than
        all of them, as ``((start, stop), ...)`` per learned dim; ``None``: all taps.

        Only :class:`Dcls2d`'s depthwise fast path builds partial kernels (on maps smaller
        than the kernel, e.g. ConvNeXt's last stage); the other layers always use every tap.
        """
        return None

    def construction_support(self, kernel: Tensor,
                             window: Optional[Window] = None) -> Optional[Callable[[], Tensor]]:
        """For a ``kernel`` just built by :meth:`construct_kernel`: a function giving the
        taps whose gradient the construction reads (:func:`dcls_mm.ops.kernel.
        gradient_support`, from the positions as they are now), which :meth:`conv` may
        pass to the convolution so that its kernel gradient skips the others; ``None``
        when there is no such rule or no kernel gradient (only depthwise 2-D layers on
        the CPU use one)."""
        return None

    def conv(self, x: Tensor, kernel: Tensor, window: Optional[Window] = None,
             grad_support: Optional[Callable[[], Tensor]] = None) -> Tensor:
        """Convolve ``x`` with a given dense ``kernel`` using this layer's geometry and bias.

        Args:
            x: the input.
            kernel: ``(C_out, C_in/groups, *kernel_size)``, or the ``window`` of it.
            window: the taps ``kernel`` holds, from :meth:`kernel_window` (``None``: all).
            grad_support: only for a ``kernel`` from this layer's construction, from
                :meth:`construction_support` (the layer's forward passes it): the kernel
                gradient may then be 0 outside those taps. ``None``: exact everywhere.
        """
        if window is not None:
            raise ValueError(f'{type(self).__name__} convolves with whole kernels only, got '
                             f'window={window}')
        conv = _CONV[self.conv_dims]
        symmetric = all(lo == hi for lo, hi in self.padding)
        if self.padding_mode == 'zeros' and symmetric:
            return conv(x, kernel, self.bias, self.stride, tuple(lo for lo, _ in self.padding), 1,
                        self.groups)
        pads = [p for lo_hi in reversed(self.padding) for p in lo_hi]
        mode = 'constant' if self.padding_mode == 'zeros' else self.padding_mode
        return conv(F.pad(x, pads, mode=mode), kernel, self.bias, self.stride, 0, 1, self.groups)

    def forward(self, x: Tensor) -> Tensor:
        """Args:
            x: ``(N, C_in, *spatial)`` or unbatched ``(C_in, *spatial)``.

        Returns:
            ``(N, C_out, *spatial_out)`` (or unbatched).
        """
        return _dcls_forward(self, x)

    def __getstate__(self) -> dict:
        # a pickle (torch.save of the module, multiprocessing) or a deep copy starts
        # without the inference memo: it is derived from the parameters, and its
        # forward plans are local functions, which pickle cannot store
        state = super().__getstate__()
        state.pop('_inference_memo_', None)
        return state

    def __prepare_scriptable__(self):
        # torch.jit.script calls this first: one clear line instead of TorchScript's
        # errors on the property, the kernel memo and the custom autograd function
        raise RuntimeError(f'{type(self).__name__} cannot be compiled by torch.jit.script; '
                           'use torch.compile, torch.export.export or torch.fx instead')

    def extra_repr(self) -> str:
        s = (f'{self.in_channels}, {self.out_channels}, kernel_count={self.kernel_count}, '
             f'dilated_kernel_size={self.dilated_kernel_size}, '
             f'interpolation={self.interpolation!r}, stride={self.stride}, padding={self.padding}')
        if self.dense_kernel_size:
            s += f', dense_kernel_size={self.dense_kernel_size}'
        if self.groups != 1:
            s += f', groups={self.groups}'
        if self.bias is None:
            s += ', bias=False'
        if self.padding_mode != 'zeros':
            s += f', padding_mode={self.padding_mode!r}'
        return s


class _DclsEveryDim(_DclsNd):
    """DCLS convolution with positions learned along every kernel dim (``Dcls1d/2d/3d``):
    the public ``__init__`` once, the number of dims from ``_dims``."""

    _dims = 0

    def __init__(self, in_channels: int, out_channels: int, kernel_count: int,
                 stride: IntOrTuple = 1, padding: Union[IntOrTuple, str] = 0,
                 dilated_kernel_size: IntOrTuple = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = 'zeros', interpolation: str = 'gaussian', *,
                 version: Optional[str] = None) -> None:
        super().__init__(in_channels, out_channels, kernel_count, stride, padding,
                         dilated_kernel_size, groups, bias, padding_mode, interpolation,
                         conv_dims=self._dims, learned_dims=self._dims, version=version)


class _DclsDenseLeading(_DclsNd):
    """DCLS convolution whose kernel is dense along its leading dims and learned along
    the last one (``Dcls2_1d``, ``Dcls3_1d``); the conv dims from ``_dims``."""

    _dims = 0
    _normal_position_init = False

    def __init__(self, in_channels: int, out_channels: int, kernel_count: int,
                 stride: IntOrTuple = 1, padding: Union[IntOrTuple, str] = 0,
                 dense_kernel_size: IntOrTuple = 1, dilated_kernel_size: IntOrTuple = 1,
                 groups: int = 1, bias: bool = True, padding_mode: str = 'zeros',
                 interpolation: str = 'gaussian', *, version: Optional[str] = None) -> None:
        super().__init__(in_channels, out_channels, kernel_count, stride, padding,
                         dilated_kernel_size, groups, bias, padding_mode, interpolation,
                         conv_dims=self._dims, learned_dims=1,
                         dense_kernel_size=dense_kernel_size, version=version)


@_document_args
class Dcls1d(_DclsEveryDim):
    """1-D DCLS convolution: positions learned along the kernel's only dim.

    Input ``(N, C_in, L_in)``; ``weight`` ``(C_out, C_in/g, K)``, ``P`` (and ``SIG``)
    ``(1, C_out, C_in/g, K)``; kernel ``(C_out, C_in/g, L)``.

    Args:
{args}
    """

    _dims = 1


@_document_args
class Dcls2d(_DclsEveryDim):
    """2-D DCLS convolution: positions learned along height (``P[0]``) and width (``P[1]``).

    Input ``(N, C_in, H, W)``; ``weight`` ``(C_out, C_in/g, K)``, ``P`` (and ``SIG``)
    ``(2, C_out, C_in/g, K)``; kernel ``(C_out, C_in/g, L_0, L_1)``.

    Args:
{args}
    """

    _dims = 2

    def __init__(self, in_channels: int, out_channels: int, kernel_count: int,
                 stride: IntOrTuple = 1, padding: Union[IntOrTuple, str] = 0,
                 dilated_kernel_size: IntOrTuple = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = 'zeros', interpolation: str = 'gaussian',
                 impl: str = 'auto', *, version: Optional[str] = None) -> None:
        if impl not in IMPLS:
            raise ValueError(f'impl must be one of {IMPLS}, got {impl!r}')
        self.impl = impl
        super().__init__(in_channels, out_channels, kernel_count, stride, padding,
                         dilated_kernel_size, groups, bias, padding_mode, interpolation,
                         version=version)

    @property
    def uses_fast_path(self) -> bool:
        """Whether :meth:`conv` takes the fast depthwise path."""
        return (self.impl == 'auto' and self.padding_mode == 'zeros'
                and self.groups == self.in_channels == self.out_channels)

    def kernel_window(self, x: Tensor) -> Optional[Window]:
        """The taps of the kernel that input ``x`` meets and that can be non-zero, when
        that is fewer than all of them, as ``((start, stop), (start, stop))``; ``None``:
        all taps.

        Only the depthwise fast path builds partial kernels. Two exact crops: on maps
        smaller than the kernel, the taps that meet the map
        (:func:`dcls_mm.ops.depthwise.used_taps`); on the CPU, the square around the centre
        outside which the kernel and its gradient are 0
        (:func:`dcls_mm.ops.kernel.support_radius`: at initialisation, positions near the
        centre, a few taps; trained kernels usually span the grid), kept within the
        padding so that the convolution's padding stays non-negative. The second reads
        the positions, so it is skipped on GPUs (a device synchronisation per layer) and
        while tracing or compiling (``torch.compile``/``export``, ``jit.trace``,
        ``make_fx``/AOT: the window would be frozen into the graph, or the read fails).
        """
        if not self.uses_fast_path:
            return None
        (r0, r1, c0, c1), _ = used_taps(x.shape[-2:], self.kernel_size, self.stride, self.padding)
        window = [(r0, r1), (c0, c1)]
        if self.P.device.type == 'cpu' and not tracing():
            r = support_radius(self.P, self.SIG, self.dilated_kernel_size, self.interpolation)
            for d, ((lo, hi), L, (pad_lo, pad_hi)) in enumerate(
                    zip(window, self.kernel_size, self.padding)):
                start = max(lo, min(L // 2 - r, pad_lo))
                stop = min(hi, max(L // 2 + r + 1, L - pad_hi))
                start = min(start, hi - 1)  # support and map apart: one (zero) tap
                window[d] = (start, max(stop, start + 1))
        if window == [(0, self.kernel_size[0]), (0, self.kernel_size[1])]:
            return None
        return tuple(window)

    def _window_key(self, x: Tensor) -> tuple:
        # set_impl may switch the path (only the fast one crops)
        return (*super()._window_key(x), self.uses_fast_path, self.stride, self.padding)

    def _conv_plan(self, x: Tensor, kernel: Tensor,
                   window: Optional[Window]) -> Tuple[Tensor, Optional[Callable]]:
        if not self.uses_fast_path or x.dim() != 4 or torch.is_autocast_enabled(x.device.type):
            return super()._conv_plan(x, kernel, window)
        return depthwise_conv2d_plan(x, kernel, self.stride, self.window_padding(window),
                                     self.bias)

    def window_padding(self, window: Optional[Window]) -> Tuple[Tuple[int, int], ...]:
        """The padding that gives a convolution with the ``window`` of the kernel the same
        output as one with the whole kernel and this layer's padding."""
        if window is None:
            return self.padding
        # each tap cut off before/after the window takes one padding row/column with it
        return tuple((lo - start, hi - (size - stop)) for (lo, hi), (start, stop), size
                     in zip(self.padding, window, self.kernel_size))

    def construction_support(self, kernel: Tensor,
                             window: Optional[Window] = None) -> Optional[Callable[[], Tensor]]:
        if not (self.uses_fast_path and kernel.requires_grad and not tracing()
                and has_gradient_support(self.P, self.interpolation)):
            return None
        # copies: the positions as they are now, whatever happens to them before the
        # backward (a frozen P is not saved by every construction, so an in-place change
        # would go unnoticed)
        sig = None if self.SIG is None else self.SIG.detach().clone()
        return functools.partial(gradient_support, self.P.detach().clone(), sig,
                                 self.dilated_kernel_size, self.interpolation, window)

    def conv(self, x: Tensor, kernel: Tensor, window: Optional[Window] = None,
             grad_support: Optional[Callable[[], Tensor]] = None) -> Tensor:
        if not self.uses_fast_path:
            return super().conv(x, kernel, window)
        padding = self.window_padding(window)
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            # what autocast would do to F.conv2d's input on the plain path
            x = x.to(torch.get_autocast_dtype(device_type))
        with torch.autocast(device_type=device_type, enabled=False):
            y = depthwise_conv2d(x, kernel, self.stride, padding, self.bias, grad_support)
        return y[0] if unbatched else y

    def extra_repr(self) -> str:
        return super().extra_repr() + (f', impl={self.impl!r}' if self.impl != 'auto' else '')


@_document_args
class Dcls3d(_DclsEveryDim):
    """3-D DCLS convolution: positions learned along depth, height and width.

    Input ``(N, C_in, D, H, W)``; ``weight`` ``(C_out, C_in/g, K)``, ``P`` (and ``SIG``)
    ``(3, C_out, C_in/g, K)``; kernel ``(C_out, C_in/g, L_0, L_1, L_2)``.

    Args:
{args}
    """

    _dims = 3


@_document_args
class Dcls2_1d(_DclsDenseLeading):
    """2-D convolution whose kernel is dense along height (``dense_kernel_size``) and has
    ``kernel_count`` learned positions along width (the last dim), per dense row.

    ``weight``: ``(C_out, C_in/g, dense, K)``; ``P``: ``(1, C_out, C_in/g, dense, K)``;
    kernel ``(C_out, C_in/g, dense, L)``. Positions start uniform over the range.

    Args:
{args}
    """

    _dims = 2


@_document_args
class Dcls3_1d(_DclsDenseLeading):
    """3-D convolution whose kernel is dense along depth and height (``dense_kernel_size``)
    and has ``kernel_count`` learned positions along width (the last dim).

    ``weight``: ``(C_out, C_in/g, d0, d1, K)``; ``P``: ``(1, C_out, C_in/g, d0, d1, K)``;
    kernel ``(C_out, C_in/g, d0, d1, L)``. Positions start uniform over the range.

    Args:
{args}
    """

    _dims = 3


@_document_args
class Dcls2dK1d(_DclsNd):
    """A learned 1-D DCLS kernel applied by a 2-D convolution along one spatial dim.

    ``flat_dim=0`` puts the kernel along height (kernel ``(C_out, C_in/g, L, 1)``),
    ``flat_dim=1`` along width (``(C_out, C_in/g, 1, L)``). ``weight``: ``(C_out, C_in/g, K)``,
    ``P``: ``(1, C_out, C_in/g, K)``.

    Args:
{args}
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_count: int,
                 stride: IntOrTuple = 1, padding: Union[IntOrTuple, str] = 0,
                 dilated_kernel_size: IntOrTuple = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = 'zeros', interpolation: str = 'bilinear_normalized',
                 flat_dim: int = 0, *, version: Optional[str] = None) -> None:
        if flat_dim not in (0, 1):
            raise ValueError(f'flat_dim must be 0 (height) or 1 (width), got {flat_dim!r}')
        self.flat_dim = flat_dim
        super().__init__(in_channels, out_channels, kernel_count, stride, padding,
                         dilated_kernel_size, groups, bias, padding_mode, interpolation,
                         conv_dims=2, learned_dims=1, version=version)

    @property
    def kernel_size(self) -> Tuple[int, ...]:
        (size,) = self.dilated_kernel_size
        return (size, 1) if self.flat_dim == 0 else (1, size)

    def construct_kernel(self, window: Optional[Window] = None) -> Tensor:
        return super().construct_kernel(window).unsqueeze(-1 - self.flat_dim)


#: the public DCLS layer classes, for ``isinstance`` checks outside :mod:`dcls_mm.ops`
#: (:func:`dcls_mm.ops.is_dcls_layer` also recognises the reference package's layers)
DCLS_LAYER_TYPES: Tuple[type, ...] = (Dcls1d, Dcls2d, Dcls3d, Dcls2_1d, Dcls3_1d, Dcls2dK1d)


def set_impl(model: nn.Module, impl: str) -> nn.Module:
    """Set ``impl`` (``'auto'`` or ``'plain'``) on every :class:`Dcls2d` in ``model``."""
    if impl not in IMPLS:
        raise ValueError(f'impl must be one of {IMPLS}, got {impl!r}')
    for _, m in dcls_layers(model):
        if isinstance(m, Dcls2d):
            m.impl = impl
    return model
