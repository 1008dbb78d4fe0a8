"""Parameters, FLOPs, activations and throughput of models (the columns of the DCLS
paper's Table 2), counted with mmengine's fvcore-derived ``FlopAnalyzer`` /
``ActivationAnalyzer`` (jit trace, one FLOP = one multiply-accumulate, element-wise
ops and normalisation statistics as mmengine counts them).

A DCLS layer is counted as what it computes:

- the dense convolution it runs with its constructed kernel (``C_out x C_in/g x
  L_0 x ... `` taps per output value), traced as ``aten::_convolution`` with the full
  dilated kernel (the layers run the plain path during the count; the fast depthwise
  path's crops, to the taps that meet a small input and to the square the positions
  reach, are implementation details);
- plus the construction of that kernel: ``weight.numel() * 2^D`` for the bilinear
  interpolations (one multiply-accumulate per tap of each element) and
  ``weight.numel() * L_0 * ... * L_{D-1}`` for triangle/gaussian (the contraction of
  the separable profiles over the ``K`` elements at every grid cell), see
  :func:`construction_flops`.
"""
from __future__ import annotations

import contextlib
import math
from typing import Dict, Iterator, List, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from dcls_mm.ops import layer_interpolation

from .layers import named_dcls_layers

BILINEAR = ('bilinear', 'bilinear_normalized')


def construction_flops(weight_numel: int, dilated_kernel_size: Sequence[int],
                       interpolation: str) -> int:
    """Multiply-accumulates of one DCLS kernel construction.

    Args:
        weight_numel: number of weights (``C_out * C_in/g * [dense] * K``).
        dilated_kernel_size: ``(L_0, ..., L_{D-1})``.
        interpolation: canonical interpolation name.
    """
    if interpolation in BILINEAR:
        return weight_numel * 2 ** len(dilated_kernel_size)
    return weight_numel * math.prod(dilated_kernel_size)


class DclsConstruction(torch.autograd.Function):
    """Stands for a DCLS kernel construction in a jit trace (one ``prim::PythonOp``
    node, counted by :func:`_construction_handle`): returns the precomputed kernel."""

    @staticmethod
    def forward(ctx, weight: Tensor, P: Tensor, cost: Tensor, kernel: Tensor) -> Tensor:
        return kernel.clone()

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - only traced, never differentiated
        return None, None, None, None


def _construction_handle(inputs, outputs) -> int:
    """mmengine op handle: the cost is carried by the node's third input, a 0-d
    tensor constant holding :func:`construction_flops`."""
    return int(inputs[2].toIValue().item())


@contextlib.contextmanager
def _counting_mode(model: nn.Module) -> Iterator[None]:
    """DCLS layers run the plain convolution with their kernel given by a
    :class:`DclsConstruction` node while the context is open."""
    patched = []
    try:
        for _, layer in named_dcls_layers(model):
            with torch.no_grad():
                kernel = layer.construct_kernel().detach()
            cost = torch.tensor(construction_flops(
                layer.weight.numel(), layer.dilated_kernel_size, layer_interpolation(layer)))

            # window: the plain path (set below) always asks for the whole kernel
            def construct(window=None, layer=layer, kernel=kernel, cost=cost):
                return DclsConstruction.apply(layer.weight, layer.P, cost, kernel)

            patched.append((layer, getattr(layer, 'impl', None)))
            layer.construct_kernel = construct
            if hasattr(layer, 'impl'):
                layer.impl = 'plain'
        yield
    finally:
        for layer, impl in patched:
            del layer.construct_kernel
            if impl is not None:
                layer.impl = impl


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (a parameter shared by several modules once).

    Args:
        model: the model.
    """
    return sum(p.numel() for p in model.parameters())


def measure_complexity(model: nn.Module, input_shape: Sequence[int] = (3, 224, 224)) -> dict:
    """Parameters, FLOPs and activations of ``model`` for one image.

    Args:
        model: the model (its ``forward`` takes one image batch).
        input_shape: ``(C, H, W)`` of the image.

    Returns:
        ``{'params', 'flops', 'activations', 'flops_by_operator'}`` (ints; FLOPs are
        multiply-accumulates).
    """
    from mmengine.analysis import ActivationAnalyzer, FlopAnalyzer
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x = torch.randn(1, *input_shape, device=device)
    handle = {'prim::PythonOp.DclsConstruction': _construction_handle}
    try:
        with _counting_mode(model):
            flops = FlopAnalyzer(model, (x,)).set_op_handle(**handle)
            flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            acts = ActivationAnalyzer(model, (x,)).set_op_handle(
                **{'prim::PythonOp.DclsConstruction': None})
            acts.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            total_flops, total_acts = int(flops.total()), int(acts.total())
            by_op = {k: int(v) for k, v in flops.by_operator().items()}
    finally:
        model.train(was_training)
    return dict(params=count_parameters(model), flops=total_flops, activations=total_acts,
                flops_by_operator=by_op)


def measure_throughput(model: nn.Module, input_shape: Sequence[int] = (3, 224, 224),
                       batch_size: int = 8, device: str = 'cpu', repeats: int = 5,
                       warmup: int = 2) -> float:
    """Inference throughput in images per second (median of ``repeats`` timed batches,
    under ``torch.inference_mode``, after ``warmup`` batches).

    Args:
        model: the model (moved to ``device``).
        input_shape: ``(C, H, W)``.
        batch_size: images per batch.
        device: ``'cpu'`` or ``'cuda[:i]'``.
        repeats: timed batches.
        warmup: untimed batches first.
    """
    from dcls_mm.utils.benchmark import time_fn
    model = model.to(device).eval()
    x = torch.randn(batch_size, *input_shape, device=device)
    with torch.inference_mode():
        seconds = time_fn(lambda: model(x), device=device, repeats=repeats, warmup=warmup)
    return batch_size / seconds


def complexity_table(rows: Sequence[Mapping], baseline: Optional[str] = None) -> str:
    """A Markdown table like the DCLS paper's Table 2.

    Args:
        rows: dicts with ``model``, ``input`` (``'224x224'``), ``params``, ``flops``,
            ``activations`` and optionally ``throughput`` (images/s).
        baseline: label of the row throughputs are compared to (default: the first).

    Returns:
        The table (header, separator, one line per row), ending with a newline.
    """
    with_speed = any(r.get('throughput') is not None for r in rows)
    base = next((r for r in rows if r['model'] == baseline), rows[0]) if rows else None
    head = ['model', 'input', 'params (M)', 'FLOPs (G)', 'activations (M)']
    if with_speed:
        head += ['throughput (img/s)', f'vs {base["model"]}']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in rows:
        cells = [f'`{r["model"]}`', r['input'], f'{r["params"] / 1e6:.2f}',
                 f'{r["flops"] / 1e9:.2f}', f'{r["activations"] / 1e6:.2f}']
        if with_speed:
            t, b = r.get('throughput'), base.get('throughput')
            cells += ['-' if t is None else f'{t:.1f}',
                      '-' if t is None or not b else f'{t / b:.2f}x']
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


def run_complexity(models: Mapping[str, nn.Module], input_shape: Sequence[int] = (3, 224, 224),
                   throughput: bool = True, batch_size: int = 8, device: str = 'cpu',
                   repeats: int = 5) -> List[Dict]:
    """:func:`measure_complexity` (and :func:`measure_throughput`) of several models.

    Args:
        models: ``{label: model}``.
        input_shape: ``(C, H, W)``.
        throughput: also measure throughput.
        batch_size: throughput batch size.
        device: throughput device.
        repeats: throughput timed batches.

    Returns:
        One row per model for :func:`complexity_table`.
    """
    from tqdm import tqdm
    rows = []
    for label, model in tqdm(models.items(), desc='complexity', unit='model'):
        row = dict(model=label, input='x'.join(str(s) for s in input_shape[1:]),
                   **measure_complexity(model, input_shape))
        row['throughput'] = (measure_throughput(model, input_shape, batch_size, device, repeats)
                             if throughput else None)
        rows.append(row)
    return rows
