"""Deprecated location of the checkpoint helpers, kept so older imports keep working.

The module did three jobs; each now lives with its own kind of code:

* reading files safely, and the structure every checkpoint shares:
  :mod:`dcls_mm.utils.checkpoint_io` (``load_checkpoint_file``, ``CheckpointReadError``,
  ``UnsafeCheckpointError``, ``unwrap_checkpoint``, ``select_prefix``);
* the ConvNeXt-dcls key policy, next to the model:
  :mod:`dcls_mm.models.backbones.convnext_dcls` (``checkpoint_filter_fn``,
  ``load_pretrained``, ``resolve_checkpoint_format``, ``CHECKPOINT_FORMATS``);
* architecture inference and conversion: :mod:`dcls_mm.models.convert`;
* hooking the checked reader into mmengine: :func:`dcls_mm.engine.register_checkpoint_loader`
  (made by ``import dcls_mm.engine``; importing this module no longer does it).
"""
from dcls_mm.utils.checkpoint_io import (CheckpointReadError, UnsafeCheckpointError,
                                         load_checkpoint_file, select_prefix,
                                         unwrap_checkpoint)
from dcls_mm.utils.checkpoint_io import \
    register_checkpoint_loader as use_checked_checkpoint_loader  # noqa: F401
from dcls_mm.utils.checkpoint_io import format_keys as _fmt  # noqa: F401
from dcls_mm.utils.checkpoint_io import select_prefix as _select_prefix  # noqa: F401

from .backbones.convnext_dcls import (CHECKPOINT_FORMATS, checkpoint_filter_fn, load_pretrained,
                                      resolve_checkpoint_format)
from .convert import DCLS_MM_META_KEY, infer_backbone_kwargs

__all__ = ['CHECKPOINT_FORMATS', 'DCLS_MM_META_KEY', 'CheckpointReadError',
           'UnsafeCheckpointError', 'checkpoint_filter_fn', 'infer_backbone_kwargs',
           'load_checkpoint_file', 'load_pretrained', 'resolve_checkpoint_format',
           'select_prefix', 'unwrap_checkpoint']
