"""Check the DCLS layers on a device against a float64 CPU reference.

The test suite runs on the CPU; this is what to run on a new machine, GPU or CPU
(``tools/analysis/check_device.py``), before trusting it with a training run: for every
interpolation, stride 1 and 2, depthwise (the fast path with spread and with initial
positions, and the plain path) and grouped,
it compares the output and every gradient (input, weight, ``P``, ``SIG``, bias) of
:class:`~dcls_mm.ops.Dcls2d` on the device with the same layer in float64 on the CPU
(plain path), in float32 and under bfloat16 autocast. The fast path runs once with the
routes this machine measured and once with each route of :data:`FORCED_ROUTES` forced
(``DCLS_MM_ROUTES``), so that a route the measurement did not pick is checked too.
"""
from __future__ import annotations

import contextlib
import copy
import os
from typing import Dict, Iterator, List, Optional, Sequence

import torch
from torch import Tensor

from .kernel import INTERPOLATIONS
from .modules import Dcls2d
from .routes import ENV_FORCE
from .triton_conv import no_tf32 as _no_tf32

#: largest error allowed, relative to the reference's largest magnitude (per tensor):
#: float32 rounding over sums of a few thousand terms, bfloat16's 8-bit mantissa
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
#: the routes of each op per device type, each forced in turn on the fast path (a route
#: not available for a call falls back to the measured choice, see dcls_mm.ops.routes)
FORCED_ROUTES = {
    'cpu': ('conv=onednn', 'conv=direct', 'conv=sparse', 'kernel_grad=direct', 'kernel_grad=fft',
            'kernel_grad=sparse',
            'construct=compiled', 'construct=torch'),
    'cuda': ('conv=aten', 'conv=triton', 'kernel_grad=fft', 'kernel_grad=aten',
             'construct=triton', 'construct=torch'),
}


@contextlib.contextmanager
def _forced(spec: Optional[str]) -> Iterator[None]:
    """``DCLS_MM_ROUTES=spec`` while open (``None``: as the caller had it)."""
    saved = os.environ.get(ENV_FORCE)
    if spec is not None:
        os.environ[ENV_FORCE] = spec
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(ENV_FORCE, None)
        else:
            os.environ[ENV_FORCE] = saved


def _layer(interpolation: str, channels: int, groups: int, stride: int,
           spread: bool = True) -> Dcls2d:
    dks = 9
    padding = 'same' if stride == 1 else dks // 2
    layer = Dcls2d(channels, channels, kernel_count=6, stride=stride, padding=padding,
                   dilated_kernel_size=dks, groups=groups, bias=True, interpolation=interpolation)
    with torch.no_grad():
        if spread:  # over the whole kernel, as after training
            layer.P.uniform_(-dks / 2 + 0.5, dks / 2 - 0.5)
        layer.bias.normal_()
    return layer


def _run(layer: Dcls2d, x: Tensor, grad: Tensor, autocast_dtype=None) -> Dict[str, Tensor]:
    """Output and every gradient of one forward/backward, as float64 CPU tensors."""
    x = x.clone().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16,
                        enabled=autocast_dtype is not None):
        y = layer(x)
    y.backward(grad.to(y.dtype))
    out = {'output': y, 'grad_input': x.grad}
    out.update({f'grad_{name}': p.grad for name, p in layer.named_parameters()})
    return {k: v.detach().double().cpu() for k, v in out.items()}


def check_device(device: str = 'cuda', interpolations: Sequence[str] = INTERPOLATIONS,
                 seed: int = 0) -> List[dict]:
    """Compare :class:`Dcls2d` on ``device`` with float64 on the CPU.

    Args:
        device: the device to check (``'cuda'``, ``'cuda:1'``, ``'cpu'``...).
        interpolations: which interpolations to check.
        seed: seed of the random layers and inputs.

    Returns:
        One record per (interpolation, stride, path, routes, dtype, tensor): ``routes`` is
        ``'measured'`` or the forced ``op=route`` (fast path only); ``error`` (largest
        absolute difference over the reference's largest magnitude), ``tolerance`` and
        ``ok``.
    """
    dev = torch.device(device)
    records = []
    generator = torch.Generator().manual_seed(seed)
    channels = 32
    for interpolation in interpolations:
        for stride in (1, 2):
            # 'centred': the fast path with initial positions (near the centre), where
            # the CPU convolves with only the taps they reach
            for path, groups in (('depthwise', channels), ('centred', channels),
                                 ('plain', channels), ('grouped', 4)):
                torch.manual_seed(int(torch.randint(2 ** 31, (1,), generator=generator)))
                ref_layer = _layer(interpolation, channels, groups, stride,
                                   spread=path != 'centred').double()
                ref_layer.impl = 'plain'
                x = torch.randn(2, channels, 15, 14, generator=generator, dtype=torch.float64)
                ho, wo = ref_layer(x).shape[-2:]
                grad = torch.randn(2, channels, ho, wo, generator=generator, dtype=torch.float64)
                want = _run(ref_layer, x, grad)
                layer = copy.deepcopy(ref_layer).float().to(dev)
                layer.impl = 'plain' if path == 'plain' else 'auto'
                xd = x.float().to(dev).contiguous(memory_format=torch.channels_last)
                forced = (None, *FORCED_ROUTES.get(dev.type, ())) if path == 'depthwise' \
                    else (None,)
                for spec in forced:
                    for dtype in (torch.float32, torch.bfloat16):
                        layer.zero_grad(set_to_none=True)
                        # float32 is checked as float32: PyTorch lets cuDNN convolutions
                        # use TF32 (10-bit mantissa) unless told otherwise
                        with _no_tf32(), _forced(spec):
                            got = _run(layer, xd, grad.float().to(dev),
                                       None if dtype == torch.float32 else dtype)
                        for name, ref in want.items():
                            scale = ref.abs().max().item() or 1.0
                            error = (got[name] - ref).abs().max().item() / scale
                            records.append(dict(
                                interpolation=interpolation, stride=stride, path=path,
                                routes=spec or 'measured', fast_path=layer.uses_fast_path,
                                dtype=str(dtype).replace('torch.', ''), tensor=name,
                                error=error, tolerance=TOLERANCE[dtype],
                                ok=bool(error <= TOLERANCE[dtype])))
    return records
