"""Build the model an analysis tool looks at from a short command-line spec.

A spec is ``SOURCE[@CHECKPOINT]`` with ``SOURCE`` one of:

- ``path/to/config.py``: an mmdet/mmseg/mmengine config; its ``model.backbone`` (or
  ``model`` when it has none) is built in the config's ``default_scope``. A checkpoint
  of the whole detector/segmentor is read under its ``backbone.`` prefix;
- ``timm:NAME``: a timm model (``convnext_dcls_tiny``, ``convnext_atto``, ...; the
  ConvNeXt-dcls ones are registered by ``import dcls_mm.models``), built with
  ``pretrained=False``;
- ``convnext_dcls:KEY=VALUE,...``: :class:`~dcls_mm.models.ConvNeXtDCLS` with these
  keyword arguments (values as Python literals, e.g.
  ``convnext_dcls:arch=atto,dwconv_type=dense`` or ``convnext_dcls:arch=tiny,dilated_kernel_size=17``).

Checkpoints of ConvNeXt-dcls models (published, dcls-mm, mmengine training files) go
through :func:`dcls_mm.models.load_pretrained` (one filter for every format); other
models load the (prefix-selected) state dict strictly.
"""
from __future__ import annotations

import ast
import os.path as osp
from typing import Dict, Optional, Sequence, Tuple

from torch import nn

SOURCE_KINDS = ('config .py', 'timm:NAME', 'convnext_dcls:KEY=VALUE,...')


def parse_model_spec(spec: str) -> Tuple[str, str, Optional[str]]:
    """Split a spec into ``(kind, argument, checkpoint or None)``.

    Args:
        spec: ``SOURCE[@CHECKPOINT]`` (see the module docstring).

    Returns:
        ``kind`` is ``'config'``, ``'timm'`` or ``'convnext_dcls'``.

    Raises:
        ValueError: a spec of no known kind, or a config / checkpoint file that does not exist.
    """
    source, _, checkpoint = spec.partition('@')
    checkpoint = checkpoint or None
    if checkpoint is not None and not osp.isfile(checkpoint):
        raise ValueError(f'model spec {spec!r}: checkpoint {checkpoint!r} is not a file')
    if source.endswith('.py'):
        if not osp.isfile(source):
            raise ValueError(f'model spec {spec!r}: config {source!r} is not a file')
        return 'config', source, checkpoint
    kind, sep, arg = source.partition(':')
    if sep and kind in ('timm', 'convnext_dcls'):
        return kind, arg, checkpoint
    raise ValueError(f'model spec {spec!r}: SOURCE must be one of {", ".join(SOURCE_KINDS)} '
                     '(optionally followed by @CHECKPOINT)')


def _split_top_level(text: str) -> list:
    """Split on commas outside brackets (``arch={'depths': [1, 1], ...}`` stays whole)."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += char in '([{'
        depth -= char in ')]}'
        if char == ',' and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item for item in items if item.strip()]


def _parse_kwargs(text: str) -> dict:
    kwargs = {}
    for item in _split_top_level(text):
        key, sep, value = item.partition('=')
        if not sep:
            raise ValueError(f'convnext_dcls arguments are KEY=VALUE pairs, got {item!r}')
        try:
            kwargs[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            kwargs[key.strip()] = value.strip()  # a bare word such as atto or dense
    return kwargs


def _load_weights(model: nn.Module, checkpoint: str, prefix: Optional[str]) -> None:
    """Load ``checkpoint`` into ``model`` (ConvNeXt-dcls filter, or strict for others)."""
    from dcls_mm.models import ConvNeXtDCLS, load_checkpoint_file, load_pretrained
    from dcls_mm.utils.checkpoint_io import select_prefix, unwrap_checkpoint
    from dcls_mm.models.classifiers import ConvNeXtDCLSClassifier
    if isinstance(model, (ConvNeXtDCLS, ConvNeXtDCLSClassifier)):
        load_pretrained(model, checkpoint, prefix=prefix)
        return
    state_dict, _ = unwrap_checkpoint(load_checkpoint_file(checkpoint))
    state_dict = select_prefix(state_dict, prefix)
    result = model.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f'{checkpoint} does not fit {type(model).__name__}: missing keys '
                         f'{result.missing_keys[:5]}, unexpected keys '
                         f'{result.unexpected_keys[:5]}')


def build_analysis_model(spec: str) -> nn.Module:
    """Build the model of a spec (see the module docstring), weights loaded, in eval mode.

    Args:
        spec: ``SOURCE[@CHECKPOINT]``.

    Returns:
        The backbone (config), the timm model, or the ConvNeXtDCLS backbone.
    """
    import dcls_mm.models  # noqa: F401  (registers the backbone and the timm models)
    kind, arg, checkpoint = parse_model_spec(spec)
    prefix = None
    if kind == 'config':
        from mmengine.config import Config
        from mmengine.registry import MODELS, init_default_scope
        cfg = Config.fromfile(arg)
        model_cfg = cfg.get('model')
        if model_cfg is None:
            raise ValueError(f'config {arg} has no "model" entry')
        part = model_cfg.get('backbone', model_cfg)
        prefix = 'backbone.' if 'backbone' in model_cfg else ''
        part = part.copy()
        part['init_cfg'] = None  # weights come from CHECKPOINT, never from the config's paths
        if str(part.get('type', '')).startswith('dcls_mm.'):
            # our own registry: no need to import the downstream package (mmdet/mmseg)
            from dcls_mm.registry import MODELS as DCLS_MODELS
            model = DCLS_MODELS.build(part)
        else:
            init_default_scope(cfg.get('default_scope', 'mmengine'))
            model = MODELS.build(part)
    elif kind == 'timm':
        import timm
        model = timm.create_model(arg, pretrained=False)
    else:
        from dcls_mm.models import ConvNeXtDCLS
        model = ConvNeXtDCLS(**_parse_kwargs(arg))
    if checkpoint is not None:
        _load_weights(model, checkpoint, prefix)
    return model.eval()


def default_label(spec: str) -> str:
    """A short plot/table label for a spec: the config's or model's name (plus the
    checkpoint's file name).

    Args:
        spec: ``SOURCE[@CHECKPOINT]``.
    """
    kind, arg, checkpoint = parse_model_spec(spec)
    name = osp.splitext(osp.basename(arg))[0] if kind == 'config' else (
        arg if kind == 'timm' else f'ConvNeXtDCLS({arg})')
    return name + (f' @ {osp.basename(checkpoint)}' if checkpoint else '')


def build_labelled_models(specs: Sequence[str], labels: Optional[Sequence[str]] = None,
                          threads: Optional[int] = None) -> Dict[str, nn.Module]:
    """``{label: model}`` for the ``--model``/``--label`` options of the analysis tools.

    Args:
        specs: model specs (see the module docstring).
        labels: one label per spec, or ``None`` for :func:`default_label`.
        threads: torch intra-op threads to use from now on (``None``: unchanged).

    Raises:
        ValueError: a label count that does not match, two equal labels, a bad spec.
    """
    if threads:
        import torch
        torch.set_num_threads(threads)
    if labels is not None and len(labels) != len(specs):
        raise ValueError(f'{len(labels)} --label for {len(specs)} --model')
    labels = list(labels) if labels is not None else [default_label(s) for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f'labels must differ, got {labels}: pass --label per --model')
    return {label: build_analysis_model(spec) for label, spec in zip(labels, specs)}
