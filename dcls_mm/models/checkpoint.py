"""Loading ConvNeXt-dcls checkpoints: one remapping function for every entry point.

:func:`checkpoint_filter_fn` (timm's ``pretrained_filter_fn`` signature) turns any
supported checkpoint into the state dict of a given model -- a :class:`ConvNeXtDCLS`
backbone or a timm ``ConvNeXtDCLSClassifier`` -- and raises a ``ValueError`` listing
every unknown key, shape mismatch and missing key. It is used by
``ConvNeXtDCLS.init_weights`` (``init_cfg=dict(type='Pretrained')``), by
``tools/model_converters/convert_convnext_dcls.py`` and by timm's ``pretrained=True``.

Supported inputs (keys as published with the paper, Zenodo records 7112021 / 8029747):

* classification: ``{'model': {downsample_layers.*, stages.*, norm.*, head.*}}``;
* downstream (mmdet/mmseg): ``{'state_dict': {'backbone.*', 'neck.*', ...}}`` with the
  output norms ``backbone.norm{i}``; everything outside ``backbone.`` is dropped;
* dcls-mm checkpoints (mmengine format, ``{'meta': ..., 'state_dict': ...}``);
* the gaussian ConvNeXt-T (``SIG`` present, positions in the reference package's
  gauss axis order: ``P[0]`` = width), converted with
  :func:`dcls_mm.ops.convert_reference_state_dict`;
* a flat state dict of any of the above.

Checkpoint formats (``checkpoint_format``):

* ``'dcls_mm'``: positions already in dcls-mm order (``P[0]`` = height). True for
  dcls-mm checkpoints AND for the published bilinear (``'v0'``) checkpoints.
* ``'reference_gauss'``: reference ``'gauss'``/``'v1'``/``'max'`` order: ``P``/``SIG``
  are converted.
* ``'auto'``: no ``SIG`` entries -> ``'dcls_mm'``; ``SIG`` and a ``meta`` dict (everything
  dcls-mm / mmengine writes) -> ``'dcls_mm'``; ``SIG`` in the published layout (a
  ``{'model': ...}`` file without ``meta`` or ``state_dict``) -> ``'reference_gauss'``.
  Any other file with ``SIG`` (e.g. a bare state dict, or timm's unwrapped dict) is
  ambiguous and raises: pass the format explicitly rather than risk transposed kernels.
"""
from __future__ import annotations

import os.path as osp
import pickle
import re
from collections import Counter, OrderedDict
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from mmengine.logging import print_log
from torch import Tensor, nn

from dcls_mm.ops import convert_reference_state_dict

CHECKPOINT_FORMATS = ('auto', 'dcls_mm', 'reference_gauss')
#: ``meta`` marker written by the converter.
DCLS_MM_META_KEY = 'dcls_mm_checkpoint'
_REMOTE = ('http://', 'https://', 's3://', 'open-mmlab://', 'mmcls://', 'torchvision://',
           'openmmlab://', 'modelzoo://', 'pavi://')


# --- reading files ------------------------------------------------------------------------
class CheckpointReadError(ValueError):
    """A checkpoint file cannot be read (missing, empty, truncated, not a torch file,
    refused content, or non-finite values); the message names the file and the problem."""


class UnsafeCheckpointError(CheckpointReadError, pickle.UnpicklingError):
    """The file pickles objects other than tensors and mmengine training state."""


def _history_buffer_getattr(obj, name):
    """The only ``getattr`` a training checkpoint needs: HistoryBuffer's statistics
    methods are pickled (protocol 2) as ``getattr(HistoryBuffer, 'mean')``. A general
    ``getattr`` would let a crafted pickle walk to ``__globals__`` and run anything."""
    from mmengine.logging import HistoryBuffer
    if obj is HistoryBuffer and name in ('min', 'max', 'mean', 'current') + tuple(
            HistoryBuffer._statistics_methods):
        return getattr(obj, name)
    raise pickle.UnpicklingError(f'refusing getattr({obj!r}, {name!r}) in a checkpoint')


def _training_checkpoint_globals() -> list:
    """What an mmengine training checkpoint pickles besides torch's own weights-only
    allow-list: MessageHub's HistoryBuffer (and ``getattr`` on its statistics methods
    only) and numpy arrays, scalars and dtypes. Handed to torch's public
    ``torch.serialization.safe_globals``: torch's weights-only unpickler does the
    refusing, for the zip and the legacy format and every pickle protocol."""
    import numpy as np
    from mmengine.logging import HistoryBuffer
    multiarray = np._core.multiarray
    out = [HistoryBuffer, np.ndarray, np.dtype, multiarray._reconstruct, multiarray.scalar,
           (_history_buffer_getattr, 'builtins.getattr')]
    # numpy 2 pickles dtypes by their class (numpy.dtypes.Float64DType, ...)
    out += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith('DType')]
    # files written under numpy 1 name numpy.core.multiarray
    out += [(multiarray._reconstruct, 'numpy.core.multiarray._reconstruct'),
            (multiarray.scalar, 'numpy.core.multiarray.scalar')]
    return out


def _non_finite_keys(obj, prefix: str = '') -> List[str]:
    """Keys (dotted paths) of floating-point tensors holding NaN or Inf."""
    if isinstance(obj, Tensor):
        if obj.is_floating_point() and not bool(torch.isfinite(obj).all()):
            return [prefix or '<tensor>']
        return []
    if isinstance(obj, dict):
        return [k for key, v in obj.items()
                for k in _non_finite_keys(v, f'{prefix}.{key}' if prefix else str(key))]
    return []


def _check_finite(filename: str, checkpoint) -> None:
    # NaN positions would otherwise surface at the first forward as a meaningless
    # out-of-bounds index; optimizer state is left alone (it may hold inf legitimately).
    for key in ('state_dict', 'model', 'state_dict_ema', 'model_ema'):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            bad = _non_finite_keys(checkpoint[key], key)
            break
    else:
        bad = _non_finite_keys(checkpoint) if _is_state_dict(checkpoint) else []
    if bad:
        raise CheckpointReadError(
            f'{filename}: {len(bad)} tensor(s) hold NaN or Inf values '
            f'(a diverged or corrupted checkpoint): {_fmt(bad, 10)}')


def _reason(error: BaseException) -> str:
    """The informative line of a torch.load error (torch's weights-only message starts
    with advice to load with ``weights_only=False``, which is exactly what we refuse)."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    for line in lines:
        if line.startswith('WeightsUnpickler error:'):
            return line[len('WeightsUnpickler error:'):].strip()
    return lines[0] if lines else 'no detail'


def load_checkpoint_file(filename: str, map_location='cpu') -> dict:
    """Read a checkpoint file without running code from it.

    Every local file is read with ``torch.load(weights_only=True)``: torch's own
    restricted unpickler, whatever the format (zip or legacy) or pickle protocol. For
    mmengine *training* checkpoints (``--resume``, ``load_from``) the allow-list is
    extended, through torch's public ``safe_globals``, by exactly the objects they hold
    (:func:`_training_checkpoint_globals`). Nothing else is ever unpickled. URLs go
    through mmengine's ``CheckpointLoader``.

    Raises:
        CheckpointReadError: one line naming the file and the problem: missing, empty,
            truncated or not a torch file; content other than tensors and training
            state (a crafted pickle); NaN/Inf in the weights (naming the keys).
    """
    if filename.startswith(_REMOTE):
        from mmengine.runner.checkpoint import CheckpointLoader
        return CheckpointLoader.load_checkpoint(filename, map_location=map_location)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'checkpoint {filename} does not exist')
    if osp.getsize(filename) == 0:
        raise CheckpointReadError(f'{filename}: the file is empty (0 bytes)')
    try:
        with torch.serialization.safe_globals(_training_checkpoint_globals()):
            checkpoint = torch.load(filename, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f'{filename}: refusing to unpickle it: it holds objects other than tensors and '
            f'mmengine training state, so loading it could run code ({_reason(e)})') from None
    except (EOFError, OSError, RuntimeError, ValueError, KeyError) as e:
        raise CheckpointReadError(
            f'{filename}: not a readable PyTorch checkpoint (truncated, or not written by '
            f'torch.save): {type(e).__name__}: {_reason(e)}') from None
    _check_finite(filename, checkpoint)
    return checkpoint


# --- remapping ----------------------------------------------------------------------------
def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def unwrap_checkpoint(checkpoint: dict) -> Tuple[Dict[str, Tensor], Optional[dict]]:
    """Return ``(flat state dict, meta or None)`` of a checkpoint (``'state_dict'`` or
    ``'model'`` wrapper, ``module.`` prefixes removed)."""
    if not isinstance(checkpoint, dict):
        raise ValueError(f'a checkpoint must be a dict, got {type(checkpoint).__name__}')
    meta = checkpoint.get('meta') if isinstance(checkpoint.get('meta'), dict) else None
    state_dict = None
    for key in ('state_dict', 'model'):
        if _is_state_dict(checkpoint.get(key)):
            state_dict = checkpoint[key]
            break
    if state_dict is None:
        if not _is_state_dict(checkpoint):
            raise ValueError('checkpoint holds no state dict: expected a "state_dict" or '
                             f'"model" entry, or a flat dict of tensors; keys: {sorted(checkpoint)[:10]}')
        state_dict = checkpoint
    state_dict = OrderedDict(
        (k[len('module.'):] if k.startswith('module.') else k, v) for k, v in state_dict.items())
    return state_dict, meta


def resolve_checkpoint_format(checkpoint_format: str, checkpoint: dict) -> str:
    """Resolve ``'auto'`` (see the module docstring) to ``'dcls_mm'`` or ``'reference_gauss'``.

    Args:
        checkpoint_format: ``'auto'``, ``'dcls_mm'`` or ``'reference_gauss'``.
        checkpoint: the checkpoint as read from the file (wrappers included).

    Raises:
        ValueError: unknown format, or ``'auto'`` on a file with ``SIG`` whose layout does
            not tell the position axis order.
    """
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f'checkpoint_format must be one of {CHECKPOINT_FORMATS}, '
                         f'got {checkpoint_format!r}')
    if checkpoint_format != 'auto':
        return checkpoint_format
    state_dict, meta = unwrap_checkpoint(checkpoint)
    if not any(k.endswith('.SIG') for k in state_dict) or meta is not None:
        return 'dcls_mm'
    if 'model' in checkpoint and 'state_dict' not in checkpoint:
        return 'reference_gauss'
    raise ValueError("this checkpoint has SIG entries but neither dcls-mm's meta nor the "
                     "published {'model': ...} layout, so the position axis order is "
                     "unknown: pass checkpoint_format='dcls_mm' (saved by dcls-mm) or "
                     "'reference_gauss' (saved by the reference DCLS package)")


def _select_prefix(state_dict: Dict[str, Tensor], prefix: Optional[str]) -> Dict[str, Tensor]:
    if prefix is None:
        prefix = 'backbone.' if any(k.startswith('backbone.') for k in state_dict) else ''
    if not prefix:
        return OrderedDict(state_dict)
    if not prefix.endswith('.'):
        prefix += '.'
    out = OrderedDict((k[len(prefix):], v) for k, v in state_dict.items() if k.startswith(prefix))
    if not out:
        raise ValueError(f'no key of the checkpoint starts with {prefix!r}')
    return out


def _dilated_kernel_size(model: nn.Module):
    from dcls_mm.ops import Dcls2d, dcls_layers
    sizes = [m.dilated_kernel_size for _, m in dcls_layers(model) if isinstance(m, Dcls2d)]
    return sizes[0] if sizes else 1


def _fmt(keys: Iterable[str], limit: int = 20) -> str:
    keys = list(keys)
    more = f' ... (+{len(keys) - limit} more)' if len(keys) > limit else ''
    return ', '.join(keys[:limit]) + more


def checkpoint_filter_fn(checkpoint: dict, model: nn.Module,
                         checkpoint_format: Optional[str] = None,
                         prefix: Optional[str] = None) -> Dict[str, Tensor]:
    """Remap a ConvNeXt-dcls checkpoint to ``model``'s state dict (timm filter signature).

    Args:
        checkpoint: a loaded checkpoint (wrapped or flat, see the module docstring; timm
            passes the state dict it unwrapped).
        model: a :class:`~dcls_mm.models.ConvNeXtDCLS` backbone or a
            :class:`~dcls_mm.models.classifiers.ConvNeXtDCLSClassifier` (any device,
            ``meta`` included: only names and shapes are used).
        checkpoint_format: ``'auto'``, ``'dcls_mm'`` or ``'reference_gauss'``;
            ``None`` uses ``model.checkpoint_format`` (default ``'auto'``).
        prefix: keep only the keys starting with it and strip it; ``None``: ``'backbone.'``
            when the checkpoint has such keys (downstream checkpoints), else nothing.

    Returns:
        A state dict whose keys and shapes are ``model``'s. For a backbone, the output
        norms ``norm{i}`` may be absent (classification checkpoints have none; they keep
        their fresh init, a message is logged). For a classifier, ``head.*`` of another
        shape (another ``num_classes``) is dropped (timm then re-initialises the head).

    Raises:
        ValueError: listing unknown keys, shape mismatches and missing keys, or if a
            stage with shared positions gets different positions across its blocks.
    """
    if checkpoint_format is None:
        checkpoint_format = getattr(model, 'checkpoint_format', 'auto')
    fmt = resolve_checkpoint_format(checkpoint_format, checkpoint)
    sd, _ = unwrap_checkpoint(checkpoint)
    sd = _select_prefix(sd, prefix)
    if fmt == 'reference_gauss':
        sd = OrderedDict(convert_reference_state_dict(sd, _dilated_kernel_size(model)))

    target = model.state_dict()
    # a classifier built with num_classes=0 has the final norm but no head weights
    is_classifier = 'head.weight' in target or 'norm.weight' in target
    out_norms = {k.split('.', 1)[0] for k in target if re.match(r'norm\d+\.', k)}
    dropped = []
    adapted = OrderedDict()
    for key, value in sd.items():
        root = key.split('.', 1)[0]
        if is_classifier:
            if re.fullmatch(r'norm\d+', root):  # downstream output norms
                dropped.append(key)
                continue
            if root == 'head' and (key not in target or target[key].shape != value.shape):
                dropped.append(key)  # another num_classes (or none): a new head
                continue
        else:
            if root == 'head':
                dropped.append(key)
                continue
            if root == 'norm':  # the classifier's final norm
                if 'norm3' in out_norms and getattr(model, 'gap_before_final_norm', False):
                    key = 'norm3' + key[len('norm'):]
                else:
                    dropped.append(key)
                    continue
            elif re.fullmatch(r'norm\d+', root) and root not in out_norms:
                dropped.append(key)  # an output this model does not produce
                continue
        adapted[key] = value

    # Shared positions: check the per-block copies, fill omitted ones.
    for i, stage in enumerate(getattr(model, 'stages', [])):
        if hasattr(stage, 'expand_shared'):
            stage.expand_shared(adapted, f'stages.{i}.')

    unexpected = [k for k in adapted if k not in target]
    mismatched = [f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}'
                  for k, v in adapted.items() if k in target and v.shape != target[k].shape]
    missing = [k for k in target if k not in adapted]
    if is_classifier:
        allowed = [k for k in missing if k.startswith('head.')]
    else:
        allowed = [k for k in missing if k.split('.', 1)[0] in out_norms]
    missing = [k for k in missing if k not in allowed]
    if unexpected or mismatched or missing:
        lines = [f'checkpoint does not match {type(model).__name__} '
                 f'(checkpoint_format={fmt!r}):']
        if unexpected:
            lines.append(f'  unexpected keys ({len(unexpected)}): {_fmt(unexpected)}')
        if mismatched:
            lines.append(f'  shape mismatches ({len(mismatched)}): {_fmt(mismatched)}')
        if missing:
            lines.append(f'  missing keys ({len(missing)}): {_fmt(missing)}')
        raise ValueError('\n'.join(lines))
    if dropped:
        print_log(f'ConvNeXt-dcls checkpoint: ignored {len(dropped)} keys not used by '
                  f'{type(model).__name__}: {_fmt(dropped, 8)}', logger='current')
    if allowed:
        print_log(f'ConvNeXt-dcls checkpoint: not in the checkpoint, kept at their init: '
                  f'{_fmt(allowed, 8)}', logger='current')
    return adapted


def load_pretrained(model: nn.Module, filename: str, prefix: Optional[str] = None,
                    map_location='cpu', checkpoint_format: Optional[str] = None) -> List[str]:
    """Read ``filename``, remap it with :func:`checkpoint_filter_fn` and load it.

    Returns:
        The model keys left at their initial values (fresh output norms / head).
    """
    checkpoint = load_checkpoint_file(filename, map_location=map_location)
    state_dict = checkpoint_filter_fn(checkpoint, model, checkpoint_format, prefix)
    result = model.load_state_dict(state_dict, strict=False)
    if result.unexpected_keys:  # cannot happen after the filter; keep loading honest
        raise ValueError(f'unexpected keys: {result.unexpected_keys}')
    print_log(f'loaded ConvNeXt-dcls weights from {filename}', logger='current')
    return list(result.missing_keys)


# --- architecture inference (converter) ---------------------------------------------------
def infer_backbone_kwargs(state_dict: Dict[str, Tensor]) -> dict:
    """Guess :class:`ConvNeXtDCLS` constructor arguments from a remapped/flat state dict
    (``arch`` dict, ``dwconv_type``, ``kernel_count``, ``share_positions``, ``in_channels``,
    whether layer scale exists, and ``'gaussian'`` when ``SIG`` is present -- pass
    ``interpolation`` yourself for ``'triangle'``). ``dilated_kernel_size`` cannot be
    inferred from weights."""
    sd, _ = unwrap_checkpoint(state_dict)
    sd = _select_prefix(sd, None)

    def majority(pattern: str, size, what: str, what_keys: str) -> int:
        # every key that carries the quantity votes: one damaged tensor cannot change the
        # inferred architecture (and then show up as dozens of shape mismatches)
        values = [size(v) for k, v in sd.items() if re.fullmatch(pattern, k)]
        if not values:
            raise ValueError(f'cannot infer {what}: the checkpoint has no {what_keys} '
                             '(not a ConvNeXt-dcls checkpoint, or an incomplete one)')
        return Counter(values).most_common(1)[0][0]

    depths, dims = [], []
    for i in range(4):
        blocks = {int(m.group(1)) for k in sd for m in [re.match(rf'stages\.{i}\.(\d+)\.', k)] if m}
        if not blocks:
            raise ValueError(f'no stages.{i}.* keys: not a ConvNeXt-dcls checkpoint')
        depths.append(max(blocks) + 1)
        dims.append(majority(rf'stages\.{i}\.\d+\.(norm\.weight|norm\.bias|dwconv\.bias|gamma|'
                             r'pwconv2\.bias)', lambda v: int(v.shape[0]),
                             f'the width of stage {i}', f'stages.{i}.*.norm/dwconv/gamma key'))
    kwargs = dict(arch=dict(depths=depths, dims=dims),
                  in_channels=majority(r'downsample_layers\.0\.0\.weight',
                                       lambda v: int(v.shape[1]), 'the input channels',
                                       "key 'downsample_layers.0.0.weight' (the stem)"))
    dw_pattern = r'stages\.\d+\.\d+\.dwconv\.weight'
    dw_keys = "'stages.*.*.dwconv.weight' key"
    if majority(dw_pattern, lambda v: v.dim(), 'the depthwise convolution type', dw_keys) == 4:
        kwargs['dwconv_type'] = 'dense'
    else:
        kwargs['dwconv_type'] = 'dcls'
        kwargs['kernel_count'] = majority(dw_pattern, lambda v: int(v.shape[-1]),
                                          'the kernel count', dw_keys)
        if any(k.endswith('.dwconv.SIG') for k in sd):
            kwargs['interpolation'] = 'gaussian'
        shared = True
        for i, depth in enumerate(depths):
            ps = [sd.get(f'stages.{i}.{j}.dwconv.P') for j in range(depth)]
            ps = [p for p in ps if p is not None]
            if any(p.shape != ps[0].shape or not torch.equal(p, ps[0]) for p in ps[1:]):
                shared = False
        kwargs['share_positions'] = shared
    if 'stages.0.0.gamma' not in sd:
        kwargs['layer_scale_init_value'] = 0.
    return kwargs


def use_checked_checkpoint_loader() -> None:
    """Make mmengine read local checkpoints with dcls-mm's checked loader.

    torch >= 2.6 defaults to ``torch.load(weights_only=True)``, with which mmengine 0.10.7
    cannot read its OWN full training checkpoints (``--resume``, ``load_from``, the
    CHECKPOINT of tools/test.py): they pickle MessageHub/HistoryBuffer state and numpy
    values. :func:`dcls_mm.models.load_checkpoint_file` reads every local file with
    ``weights_only=True``, extending torch's allow-list by exactly the objects such a
    checkpoint holds, so mmengine's own tools, mmdet/mmseg tools and ``mim train`` (once
    ``dcls_mm`` is imported) can resume while a crafted file is still refused. Remote
    URLs keep mmengine's own loaders.
    """
    from mmengine.runner.checkpoint import CheckpointLoader

    def load_from_local(filename, map_location=None):
        filename = osp.expanduser(filename)
        if not osp.isfile(filename):
            raise FileNotFoundError(f'{filename} can not be found.')
        return load_checkpoint_file(filename, map_location=map_location)

    CheckpointLoader.register_scheme(prefixes='', loader=load_from_local, force=True)
