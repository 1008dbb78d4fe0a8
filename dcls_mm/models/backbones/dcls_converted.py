"""Any OpenMMLab backbone with its convolutions converted to DCLS (config wrapper)."""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Union

from mmengine.logging import print_log
from mmengine.model import BaseModule
from torch import nn

from dcls_mm.ops import convert_dense_state_dict, convert_to_dcls
from dcls_mm.registry import MODELS
from dcls_mm.utils.checkpoint_io import (format_keys, load_checkpoint_file,
                                         pretrained_init_cfg, select_prefix, unwrap_checkpoint)


def _has_pretrained(init_cfg) -> bool:
    cfgs = init_cfg if isinstance(init_cfg, (list, tuple)) else [init_cfg]
    return any(isinstance(c, dict) and c.get('type') == 'Pretrained' for c in cfgs)


@MODELS.register_module()
class DCLSConverted(BaseModule):
    """A backbone built from its config, whose convolutions :func:`dcls_mm.ops.convert_to_dcls`
    replaces by DCLS layers at construction.

    Example (the paper's ResNet-50-dcls in mmdet: every bottleneck 3x3 conv -> DCLS with
    dilated kernel 7 at iso-parameters, positions shared per stage)::

        backbone=dict(type='dcls_mm.DCLSConverted',
                      backbone=dict(type='mmdet.ResNet', depth=50, ...),
                      dilated_kernel_size=7, kernel_count='iso', init='random',
                      select='layer*.conv2',
                      share_positions=['layer1.*', 'layer2.*', 'layer3.*', 'layer4.*'])

    The wrapped backbone is ``self.backbone`` (parameter names ``backbone.<its names>``).

    Weights: ``init_cfg=dict(type='Pretrained', checkpoint=..., prefix=None)`` on THIS
    module loads, after the wrapped backbone's own init, either a dense checkpoint of the
    wrapped backbone (e.g. ``'torchvision://resnet50'``; every converted conv's dense kernel
    is mapped exactly onto its DCLS layer by :func:`dcls_mm.ops.convert_dense_state_dict`,
    which needs ``kernel_count=None``) or a DCLS checkpoint saved after conversion (same
    names plus ``P``), or a mix. Keys the backbone lacks are logged on one line (e.g. a
    classifier's ``fc``); keys it has and the file lacks raise.

    Args:
        backbone: config of the backbone to convert (any registry scope, e.g.
            ``'mmdet.ResNet'``). Its own ``init_cfg`` must not be ``Pretrained``: a dense
            file loaded after conversion could not reach the DCLS layers, so put it here.
        dilated_kernel_size: see :func:`~dcls_mm.ops.convert_to_dcls`.
        kernel_count: ``None`` (one element per tap), ``'iso'`` or an int.
        interpolation: DCLS interpolation (default ``'bilinear'``).
        select: fnmatch patterns of the wrapped backbone's module names (or a predicate)
            of the convs to convert; default: every conv with more than one tap.
        exclude: patterns (or a predicate) of convs to keep dense.
        init: ``'exact'`` (DCLS kernels equal to the dense ones; with a dense
            ``Pretrained`` checkpoint the converted model starts as the dense one) or
            ``'random'``.
        share_positions: fnmatch patterns, one shared set of positions per pattern.
        skip_unsupported: leave unsupported convs dense (one warning) instead of raising.
        init_cfg: ``Pretrained`` (see above) or any mmengine init config.
    """

    def __init__(self, backbone: dict, dilated_kernel_size: Union[int, Sequence[int]],
                 kernel_count: Union[None, str, int] = None, interpolation: str = 'bilinear',
                 select: Union[None, str, Sequence[str], Callable] = None,
                 exclude: Union[None, str, Sequence[str], Callable] = None,
                 init: str = 'exact',
                 share_positions: Union[None, str, Sequence[str], Callable] = None,
                 skip_unsupported: bool = False,
                 init_cfg: Optional[Union[dict, List[dict]]] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        if not isinstance(backbone, dict) or 'type' not in backbone:
            raise ValueError(f'backbone must be a config dict with a "type", got {backbone!r}')
        if _has_pretrained(backbone.get('init_cfg')) or backbone.get('pretrained'):
            raise ValueError("DCLSConverted: put the Pretrained init_cfg on DCLSConverted, not "
                             f"in backbone={backbone['type']!r} (a dense checkpoint must be "
                             'mapped onto the DCLS layers after conversion)')
        inner = MODELS.build(backbone)
        if _has_pretrained(getattr(inner, 'init_cfg', None)):
            raise ValueError(f"DCLSConverted: the backbone {backbone['type']!r} sets a "
                             'Pretrained init_cfg by default; set it to None and put the '
                             'Pretrained init_cfg on DCLSConverted')
        self.backbone = convert_to_dcls(
            inner, dilated_kernel_size=dilated_kernel_size, kernel_count=kernel_count,
            interpolation=interpolation, select=select, exclude=exclude, init=init,
            share_positions=share_positions, skip_unsupported=skip_unsupported)

    def init_weights(self) -> None:
        """The wrapped backbone's own init, then a ``Pretrained`` ``init_cfg`` if given
        (dense kernels mapped exactly, see the class doc)."""
        cfg = pretrained_init_cfg(self.init_cfg)
        if cfg is None:
            super().init_weights()
            return
        if hasattr(self.backbone, 'init_weights'):
            self.backbone.init_weights()
        load_converted_checkpoint(self.backbone, cfg['checkpoint'], prefix=cfg.get('prefix'),
                                  map_location=cfg.get('map_location', 'cpu'))
        self._is_init = True

    def forward(self, *args, **kwargs):
        """The wrapped backbone's forward."""
        return self.backbone(*args, **kwargs)


def load_converted_checkpoint(model: nn.Module, filename: str, prefix: Optional[str] = None,
                              map_location: str = 'cpu') -> None:
    """Load a dense or DCLS checkpoint into a model converted by
    :func:`~dcls_mm.ops.convert_to_dcls` (dense kernels mapped exactly).

    Args:
        model: the converted model.
        filename: any mmengine checkpoint location (local path, ``torchvision://``,
            ``open-mmlab://``, URL).
        prefix: keep only the keys under this prefix, without it (e.g. ``'backbone.'``
            for a detector checkpoint); ``None``: all keys.
        map_location: where to load the tensors.

    Raises:
        ValueError: the file lacks keys of the model (one line listing them), or a dense
            kernel does not fit its converted layer.
    """
    state_dict, _ = unwrap_checkpoint(load_checkpoint_file(filename, map_location=map_location))
    if prefix:
        state_dict = select_prefix(state_dict, prefix)
    state_dict = convert_dense_state_dict(model, state_dict)
    result = model.load_state_dict(state_dict, strict=False)
    if result.missing_keys:
        raise ValueError(f'{filename}: the checkpoint lacks {len(result.missing_keys)} key(s) '
                         f'of the model: {format_keys(result.missing_keys)}')
    if result.unexpected_keys:
        print_log(f'{filename}: ignored {len(result.unexpected_keys)} key(s) the model does '
                  f'not have: {format_keys(result.unexpected_keys)}', logger='current', level=30)
    print_log(f'loaded {filename} into the DCLS-converted {type(model).__name__}',
              logger='current')
