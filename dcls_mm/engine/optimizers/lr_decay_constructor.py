"""Layer-/stage-wise learning-rate decay for ConvNeXt(-dcls) backbones, DCLS aware.

The name-to-id mapping is exactly the one of mmdet 3's / mmseg 1's
``LearningRateDecayOptimizerConstructor`` for ConvNeXt (``get_layer_id_for_convnext`` /
``get_stage_id_for_convnext``), with ``N = num_layers``:

* ``layer_wise``: ``downsample_layers.s``: s=0 -> 0, 1 -> 2, 2 -> 3, 3 -> N;
  ``stages.s.b``: s=0 -> 1, 1 -> 2, 2 -> 3 + b // 3, 3 -> N; anything else -> N + 1.
* ``stage_wise``: ``downsample_layers`` -> 0, ``stages.s`` -> s + 1, anything else -> N + 1.
* ``cls_token``/``mask_token``/``pos_embed`` of the backbone -> 0 (as upstream).

and ``lr = base_lr * decay_rate ** (N + 1 - id)``. Weight decay is 0 for 1-D parameters,
names ending in ``.bias`` and names ``pos_embed``/``cls_token`` (upstream rule).

Differences from upstream, all deliberate:

* any backbone works (upstream raises unless its class name contains ``'ConvNeXt'``);
  names that do not follow the ConvNeXt pattern simply get id ``N + 1``;
* the positions ``P`` and widths ``SIG`` of DCLS layers (found by module type, see
  :func:`dcls_mm.engine.utils.is_dcls_module`) get weight decay 0 and
  ``lr * position_lr_mult`` in their own ``layer_{id}_position`` groups (upstream would
  put the 4-D position tensors under weight decay);
* every parameter is added once, even when shared by several modules (a stage-shared
  ``P`` is named after, and decayed like, the first block that owns it, i.e.
  ``stages.s.0.dwconv.P``);
* a model without a ``backbone`` attribute is treated as the backbone itself (names
  matched without the ``backbone.`` prefix), so a bare ``ConvNeXtDCLS`` also works.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional

from mmengine.dist import get_dist_info
from mmengine.logging import print_log
from mmengine.optim import DefaultOptimWrapperConstructor
from torch import nn

from dcls_mm.registry import OPTIM_WRAPPER_CONSTRUCTORS

from ..utils import position_parameters

DECAY_TYPES = ('layer_wise', 'stage_wise')
_DOWNSAMPLE = re.compile(r'^downsample_layers\.(\d+)(\.|$)')
_STAGE = re.compile(r'^stages\.(\d+)\.(\d+)(\.|$)')
_STAGE_ONLY = re.compile(r'^stages\.(\d+)(\.|$)')
_TOKENS = ('cls_token', 'mask_token', 'pos_embed')


def get_layer_id_for_convnext(name: str, num_layers: int, prefix: str = 'backbone.') -> int:
    """Layer id of a parameter for ``layer_wise`` decay (mmdet 3 / mmseg 1 mapping).

    Args:
        name: the parameter's full name in the model.
        num_layers: ``N`` (6 for ConvNeXt-T, 12 for S/B in the published recipes).
        prefix: prefix of the backbone's parameters in ``name`` (``''``: the model is
            the backbone).

    Returns:
        An id in ``[0, N + 1]``.
    """
    if not name.startswith(prefix):
        return num_layers + 1
    local = name[len(prefix):]
    if local in _TOKENS:
        return 0
    match = _DOWNSAMPLE.match(local)
    if match:
        stage = _check_stage(int(match.group(1)), name)
        return {0: 0, 1: 2, 2: 3, 3: num_layers}[stage]
    match = _STAGE.match(local)
    if match:
        stage, block = _check_stage(int(match.group(1)), name), int(match.group(2))
        return {0: 1, 1: 2, 2: 3 + block // 3, 3: num_layers}[stage]
    return num_layers + 1


def get_stage_id_for_convnext(name: str, num_layers: int, prefix: str = 'backbone.') -> int:
    """Stage id of a parameter for ``stage_wise`` decay (mmdet 3 / mmseg 1 mapping).

    Args:
        name: the parameter's full name in the model.
        num_layers: ``N``; parameters outside the backbone stages get ``N + 1``.
        prefix: prefix of the backbone's parameters in ``name`` (``''``: the model is
            the backbone).

    Returns:
        An id in ``{0, 1, 2, 3, 4, N + 1}``.
    """
    if not name.startswith(prefix):
        return num_layers + 1
    local = name[len(prefix):]
    if local in _TOKENS or _DOWNSAMPLE.match(local):
        return 0
    match = _STAGE_ONLY.match(local)
    if match:
        return _check_stage(int(match.group(1)), name) + 1
    return num_layers + 1


def _check_stage(stage: int, name: str) -> int:
    if stage > 3:
        raise ValueError(f'lr decay knows the 4 ConvNeXt stages only, got stage {stage} '
                         f'in parameter {name!r}')
    return stage


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class DCLSLearningRateDecayOptimizerConstructor(DefaultOptimWrapperConstructor):
    """Layer-wise / stage-wise lr decay for ConvNeXt-style backbones, aware of DCLS
    positions.

    Use it from a config as
    ``optim_wrapper=dict(constructor='dcls_mm.DCLSLearningRateDecayOptimizerConstructor',
    optimizer=dict(type='AdamW', lr=2e-4, weight_decay=0.05),
    paramwise_cfg=dict(decay_rate=0.7, decay_type='layer_wise', num_layers=6))``.

    Parameter groups are named ``layer_{id}_{kind}`` with ``kind`` in ``decay``,
    ``no_decay`` and ``position``; each group carries ``lr``, ``weight_decay``,
    ``lr_scale``, ``group_name`` and ``param_names`` (like mmdet). Frozen parameters
    (``requires_grad=False``) are left out, as upstream.

    Args:
        optim_wrapper_cfg: the ``optim_wrapper`` config (``optimizer`` inside).
        paramwise_cfg: a dict with

            - ``num_layers`` (int, required): ``N`` of the mapping (see module doc).
            - ``decay_rate`` (float, required): per-id lr decay factor;
              ``lr_scale = decay_rate ** (N + 1 - id)``.
            - ``decay_type`` (str): ``'layer_wise'`` (default) or ``'stage_wise'``.
            - ``position_lr_mult`` (float): extra lr multiplier of the positions ``P``
              and ``SIG`` of DCLS layers (default 1.0; the DCLS paper used 5.0 for
              ImageNet, the published downstream code 1.0).
            - ``backbone_prefix`` (str, optional): prefix of the backbone's parameter
              names. Default: ``'backbone.'`` if the model has a ``backbone``
              attribute, else ``''`` (the model is the backbone).
    """

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg: Optional[dict] = None) -> None:
        super().__init__(optim_wrapper_cfg, paramwise_cfg)
        cfg = self.paramwise_cfg
        if not cfg:
            raise ValueError('DCLSLearningRateDecayOptimizerConstructor needs a paramwise_cfg '
                             'with num_layers and decay_rate')
        for key in ('num_layers', 'decay_rate'):
            if cfg.get(key) is None:
                raise ValueError(f'paramwise_cfg.{key} is required')
        self.num_layers = int(cfg['num_layers'])
        if self.num_layers < 3:
            raise ValueError(f'num_layers must be >= 3, got {self.num_layers}')
        self.decay_rate = float(cfg['decay_rate'])
        self.decay_type = cfg.get('decay_type', 'layer_wise')
        if self.decay_type not in DECAY_TYPES:
            raise ValueError(f'decay_type must be one of {DECAY_TYPES}, got {self.decay_type!r}')
        self.position_lr_mult = float(cfg.get('position_lr_mult', 1.0))
        self.backbone_prefix = cfg.get('backbone_prefix', None)

    def get_id(self, name: str, prefix: str) -> int:
        """Decay id of parameter ``name`` (see the module doc).

        Args:
            name: the parameter's full name in the model.
            prefix: prefix of the backbone's parameter names.
        """
        if self.decay_type == 'layer_wise':
            return get_layer_id_for_convnext(name, self.num_layers, prefix)
        return get_stage_id_for_convnext(name, self.num_layers, prefix)

    def add_params(self, params: List[dict], module: nn.Module, **kwargs) -> None:
        """Append the parameter groups of ``module`` to ``params``.

        Args:
            params: the list of parameter groups to extend (the optimizer's ``params``).
            module: the (unwrapped) model.
            **kwargs: ignored (signature compatibility with the default constructor).
        """
        prefix = self.backbone_prefix
        if prefix is None:
            prefix = 'backbone.' if isinstance(getattr(module, 'backbone', None),
                                               nn.Module) else ''
        positions = {id(p) for _, p in position_parameters(module)}
        groups: Dict[str, dict] = {}
        seen = set()
        for name, param in module.named_parameters():
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            layer_id = self.get_id(name, prefix)
            scale = self.decay_rate**(self.num_layers + 1 - layer_id)
            if id(param) in positions:
                kind, weight_decay = 'position', 0.0
                scale *= self.position_lr_mult
            elif param.ndim == 1 or name.endswith('.bias') or name in ('pos_embed', 'cls_token'):
                kind, weight_decay = 'no_decay', 0.0
            else:
                kind, weight_decay = 'decay', self.base_wd
            group_name = f'layer_{layer_id}_{kind}'
            if group_name not in groups:
                group = dict(params=[], param_names=[], group_name=group_name, lr_scale=scale,
                             lr=scale * self.base_lr)
                if weight_decay is not None:  # None: the optimizer's default weight decay
                    group['weight_decay'] = weight_decay
                groups[group_name] = group
            groups[group_name]['params'].append(param)
            groups[group_name]['param_names'].append(name)

        rank, _ = get_dist_info()
        if rank == 0:
            lines = [f'{self.__class__.__name__}: {self.decay_type} decay_rate={self.decay_rate} '
                     f'num_layers={self.num_layers} position_lr_mult={self.position_lr_mult} '
                     f'backbone_prefix={prefix!r}']
            for key, g in sorted(groups.items(),
                                 key=lambda kv: (int(kv[0].split('_')[1]), kv[0])):
                lines.append(f'  {key}: {len(g["params"])} params, lr_scale={g["lr_scale"]:.4g}, '
                             f'lr={g["lr"]:.4g}, weight_decay={g.get("weight_decay")}')
            print_log('\n'.join(lines), logger='current')
        params.extend(groups.values())
