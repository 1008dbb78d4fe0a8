"""Reading checkpoint files safely, and the structure every checkpoint shares.

* :func:`load_checkpoint_file` reads a file without running code from it (torch's
  weights-only unpickler, its allow-list extended through the public
  ``torch.serialization.safe_globals`` by exactly what an mmengine training checkpoint
  holds) and refuses NaN/Inf weights;
* :func:`register_checkpoint_loader` makes mmengine read local files through it (one
  explicit call, made by ``import dcls_mm.engine``);
* :func:`unwrap_checkpoint`, :func:`select_prefix` and :func:`match_state_dict` are the
  model-independent steps of loading weights: find the state dict, keep one prefix, and
  compare it with a model's, reporting every difference at once.

No model code is imported here (``dcls_mm.models`` builds on this module, not the other
way round); mmengine is imported only where it is called.
"""
from __future__ import annotations

import os.path as osp
import pickle
from collections import OrderedDict
import copy
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ['CheckpointReadError', 'UnsafeCheckpointError', 'load_checkpoint_file',
           'register_checkpoint_loader', 'is_state_dict', 'unwrap_checkpoint',
           'select_prefix', 'format_keys', 'match_state_dict', 'pretrained_init_cfg']

#: locations mmengine's own loaders handle (downloads, model zoos)
REMOTE_PREFIXES = ('http://', 'https://', 's3://', 'open-mmlab://', 'mmcls://',
                   'torchvision://', 'openmmlab://', 'modelzoo://', 'pavi://')


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


def is_state_dict(obj) -> bool:
    """Whether ``obj`` is a non-empty flat ``{str: Tensor}`` dict."""
    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def format_keys(keys: Iterable[str], limit: int = 20) -> str:
    """``'a, b, c ... (+N more)'``: the first ``limit`` keys of a report line."""
    keys = list(keys)
    more = f' ... (+{len(keys) - limit} more)' if len(keys) > limit else ''
    return ', '.join(keys[:limit]) + more


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
        bad = _non_finite_keys(checkpoint) if is_state_dict(checkpoint) else []
    if bad:
        raise CheckpointReadError(
            f'{filename}: {len(bad)} tensor(s) hold NaN or Inf values '
            f'(a diverged or corrupted checkpoint): {format_keys(bad, 10)}')


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

    Args:
        filename: a local path or a URL (``https://``, ``torchvision://``, ...).
        map_location: where to put the tensors, as for ``torch.load``.

    Returns:
        The checkpoint as saved (usually a dict).

    Raises:
        FileNotFoundError: no such local file.
        CheckpointReadError: one line naming the file and the problem: empty, truncated
            or not a torch file; content other than tensors and training state (a
            crafted pickle: :class:`UnsafeCheckpointError`); NaN/Inf in the weights
            (naming the keys).
    """
    if filename.startswith(REMOTE_PREFIXES):
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


def load_from_local(filename: str, map_location=None) -> dict:
    """mmengine's local-file loader signature, over :func:`load_checkpoint_file` (named
    like mmengine's own: its log line says "Loads checkpoint by local backend")."""
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'{filename} can not be found.')
    return load_checkpoint_file(filename, map_location=map_location)


def register_checkpoint_loader() -> None:
    """Make mmengine read LOCAL checkpoints with :func:`load_checkpoint_file`.

    torch >= 2.6 defaults to ``torch.load(weights_only=True)``, with which mmengine 0.10.7
    cannot read its OWN full training checkpoints (``--resume``, ``load_from``, the
    CHECKPOINT of ``tools/test.py``): they pickle MessageHub/HistoryBuffer state and numpy
    values. After this call mmengine's ``CheckpointLoader`` (hence the Runner, mmdet/mmseg
    tools and ``mim train``) reads every local file through the checked reader, so they
    resume while a crafted file is still refused. Remote URLs keep mmengine's loaders.

    The change is process-wide (mmengine keeps one loader per prefix), which is why it is
    one explicit call: ``import dcls_mm.engine`` makes it (the configs' ``custom_imports``
    and our tools import it); ``import dcls_mm.models`` does not. Calling it again is
    harmless.
    """
    from mmengine.runner.checkpoint import CheckpointLoader
    CheckpointLoader.register_scheme(prefixes='', loader=load_from_local, force=True)


def unwrap_checkpoint(checkpoint: dict) -> Tuple[Dict[str, Tensor], Optional[dict]]:
    """Return ``(flat state dict, meta or None)`` of a checkpoint (``'state_dict'`` or
    ``'model'`` wrapper, ``module.`` prefixes removed).

    Args:
        checkpoint: a loaded checkpoint, wrapped or flat.

    Raises:
        ValueError: not a dict, or no state dict in it.
    """
    if not isinstance(checkpoint, dict):
        raise ValueError(f'a checkpoint must be a dict, got {type(checkpoint).__name__}')
    meta = checkpoint.get('meta') if isinstance(checkpoint.get('meta'), dict) else None
    state_dict = None
    for key in ('state_dict', 'model'):
        if is_state_dict(checkpoint.get(key)):
            state_dict = checkpoint[key]
            break
    if state_dict is None:
        if not is_state_dict(checkpoint):
            raise ValueError('checkpoint holds no state dict: expected a "state_dict" or '
                             f'"model" entry, or a flat dict of tensors; keys: {sorted(checkpoint)[:10]}')
        state_dict = checkpoint
    state_dict = OrderedDict(
        (k[len('module.'):] if k.startswith('module.') else k, v) for k, v in state_dict.items())
    return state_dict, meta


def select_prefix(state_dict: Dict[str, Tensor], prefix: Optional[str]) -> Dict[str, Tensor]:
    """Keep the keys under ``prefix``, without it.

    Args:
        state_dict: a flat state dict.
        prefix: e.g. ``'backbone.'`` (the dot is added if missing); ``''``: every key;
            ``None``: ``'backbone.'`` when the state dict has such keys (a detector or
            segmentor checkpoint), else every key.

    Raises:
        ValueError: no key starts with an explicit ``prefix``.
    """
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


def match_state_dict(state_dict: Dict[str, Tensor], target: Dict[str, Tensor], title: str,
                     may_be_missing: Sequence[str] = ()) -> List[str]:
    """Compare a state dict with a model's and report every difference in one error.

    Args:
        state_dict: the remapped checkpoint.
        target: the model's ``state_dict()`` (only names and shapes are read).
        title: the first line of the error (what was loaded into what).
        may_be_missing: model keys the checkpoint may lack (they keep their init).

    Returns:
        The allowed model keys the checkpoint lacks.

    Raises:
        ValueError: listing unexpected keys, shape mismatches and missing keys.
    """
    unexpected = [k for k in state_dict if k not in target]
    mismatched = [f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}'
                  for k, v in state_dict.items() if k in target and v.shape != target[k].shape]
    allowed = set(may_be_missing)
    absent = [k for k in target if k not in state_dict]
    missing = [k for k in absent if k not in allowed]
    if unexpected or mismatched or missing:
        lines = [title]
        if unexpected:
            lines.append(f'  unexpected keys ({len(unexpected)}): {format_keys(unexpected)}')
        if mismatched:
            lines.append(f'  shape mismatches ({len(mismatched)}): {format_keys(mismatched)}')
        if missing:
            lines.append(f'  missing keys ({len(missing)}): {format_keys(missing)}')
        raise ValueError('\n'.join(lines))
    return [k for k in absent if k in allowed]


def pretrained_init_cfg(init_cfg) -> Optional[dict]:
    """The ``Pretrained`` entry of an mmengine ``init_cfg`` (a dict, or a list of dicts),
    for a module that loads it through its own checkpoint filter; ``None`` without one.

    Raises:
        ValueError: a ``Pretrained`` entry in a list with other entries (mmengine would
            load it itself, without the filter: no prefix stripping, key checks or
            position conversion).
    """
    entries = list(init_cfg) if isinstance(init_cfg, (list, tuple)) else [init_cfg]
    found = [c for c in entries if isinstance(c, dict) and c.get('type') == 'Pretrained']
    if not found:
        return None
    if len(entries) > 1:
        raise ValueError(f'init_cfg: give the Pretrained entry alone (as a dict or a '
                         f'one-element list), got {init_cfg}')
    return copy.deepcopy(found[0])
