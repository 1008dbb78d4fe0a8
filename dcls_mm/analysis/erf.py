"""Effective receptive field (ERF, Luo et al. 2016) as measured by RepLKNet, SLaK and
the DCLS paper (Appendix 12).

For each image, the gradient of the centre pixel of a layer's output (summed over the
output channels) with respect to the input image is taken; its absolute value, summed
over the input channels, is averaged over the images (:func:`compute_erf`; RepLKNet's
``AverageMeter``: with a sum, the log scale below made the ratios depend on the number
of images). For display and comparison the mean map is log-scaled and normalised,
``log10(erf + 1) / max`` (:func:`normalize_erf`), and the "high-contribution area ratio"
(:func:`area_ratios`) is the area of the smallest centred square whose share of the
normalised map's total exceeds a threshold, over the map's area: RepLKNet's
``get_rectangle`` at thresholds 0.2, 0.3, 0.5 and 0.99.
"""
from __future__ import annotations

import json
import os
import os.path as osp
from functools import partial
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from dcls_mm.utils.fileio import atomic_open

from .plotting import pyplot, save_figure

#: RepLKNet's thresholds of the high-contribution area ratio.
THRESHOLDS = (0.2, 0.3, 0.5, 0.99)
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')
#: ImageNet normalisation (every dcls-mm model and timm's ConvNeXts use it).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class _Stop(Exception):
    """Raised by the capture hook: nothing after the analysed layer needs to run."""


def default_layer(model: nn.Module, stage: int = -1) -> str:
    """``'stages.{i}'`` of ``model`` (ConvNeXt-dcls, timm ConvNeXt/classifiers).

    Args:
        model: the model.
        stage: stage index (negative from the end).

    Raises:
        ValueError: the model has no ``stages`` (pass a layer name instead).
    """
    stages = getattr(model, 'stages', None)
    if not isinstance(stages, nn.Sequential) and not isinstance(stages, nn.ModuleList):
        raise ValueError(f'{type(model).__name__} has no "stages": name the layer to analyse '
                         '(e.g. --layer layer4)')
    index = stage + len(stages) if stage < 0 else stage
    if not 0 <= index < len(stages):
        raise ValueError(f'stage {stage} out of range: the model has {len(stages)} stages')
    return f'stages.{index}'


def _layer_output(model: nn.Module, layer: Optional[str], x: Tensor) -> Tensor:
    """Output of ``layer`` (the model's own output when ``None``) for input ``x``; the
    forward stops right after that layer."""
    if layer is None:
        out = model(x)
        return out[-1] if isinstance(out, (tuple, list)) else out
    modules = dict(model.named_modules())
    if layer not in modules:
        raise ValueError(f'{type(model).__name__} has no layer {layer!r}')
    captured = {}

    def hook(module, inputs, output):
        captured['out'] = output[-1] if isinstance(output, (tuple, list)) else output
        raise _Stop

    handle = modules[layer].register_forward_hook(hook)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    if 'out' not in captured:
        raise ValueError(f'layer {layer!r} did not run in the forward pass')
    return captured['out']


def _save_state(path: str, key: str, accumulated: np.ndarray, done: int) -> None:
    """Write the partial sum atomically (a killed run leaves the previous state intact)."""
    with atomic_open(path, 'wb') as f:
        np.savez(f, accumulated=accumulated, done=done, key=key)


def compute_erf(model: nn.Module, images: Sequence[Union[Tensor, Callable[[], Tensor]]],
                layer: Optional[str] = None, progress: bool = True,
                state_path: Optional[str] = None, state_key: str = '',
                save_every: int = 10) -> np.ndarray:
    """ERF of ``layer``, averaged over ``images``, resumable.

    Args:
        model: the model, used as is (call ``.eval()`` first for the usual protocol).
        images: normalised images ``(3, H, W)`` or ``(1, 3, H, W)`` of one size, or
            functions returning them (read only when needed, see :func:`load_erf_images`).
        layer: name of the module (``model.named_modules()``) whose output is analysed;
            ``None``: the model's output (its last element for tuple outputs).
        progress: show a progress bar over the images.
        state_path: ``.npz`` file holding the partial sum, written every ``save_every``
            images; a later call with the same ``state_key`` continues after the images
            it counts (a killed run loses at most ``save_every`` images of work).
        state_key: describes the computation (model, layer, images); a state file with
            another key is ignored and overwritten.
        save_every: images between two writes of ``state_path``.

    Returns:
        ``(H, W)`` float64 array: mean over images of
        ``|d out[:, :, h//2, w//2].sum() / d x|`` summed over the input channels (``h, w``:
        the output's spatial size).
    """
    from tqdm import tqdm
    accumulated, done = None, 0
    if state_path is not None and osp.isfile(state_path):
        with np.load(state_path) as state:
            if str(state['key']) == state_key and int(state['done']) <= len(images):
                accumulated, done = state['accumulated'].copy(), int(state['done'])
    bar = tqdm(total=len(images), initial=done, desc='ERF', unit='img', disable=not progress)
    for index in range(done, len(images)):
        image = images[index]() if callable(images[index]) else images[index]
        x = (image if image.dim() == 4 else image.unsqueeze(0)).detach().clone()
        x.requires_grad_(True)
        out = _layer_output(model, layer, x)
        if out.dim() != 4:
            raise ValueError(f'the analysed output must be (N, C, H, W), got {tuple(out.shape)}')
        h, w = out.shape[-2:]
        (grad,) = torch.autograd.grad(out[:, :, h // 2, w // 2].sum(), x)
        contribution = grad.abs().sum((0, 1)).double().cpu().numpy()
        if accumulated is None:
            accumulated = contribution
        elif accumulated.shape != contribution.shape:
            raise ValueError(f'all images must have one size: {accumulated.shape} then '
                             f'{contribution.shape} (image {index})')
        else:
            accumulated += contribution
        bar.update()
        if state_path is not None and ((index + 1) % save_every == 0 or index + 1 == len(images)):
            _save_state(state_path, state_key, accumulated, index + 1)
    bar.close()
    if accumulated is None:
        raise ValueError('no image to compute the ERF on')
    return accumulated / len(images)


def normalize_erf(erf: np.ndarray) -> np.ndarray:
    """``log10(erf + 1) / max`` (RepLKNet's display scale, in ``[0, 1]``).

    Args:
        erf: accumulated ERF (non-negative).
    """
    scaled = np.log10(erf + 1)
    peak = scaled.max()
    return scaled / peak if peak > 0 else scaled


def area_ratios(scaled: np.ndarray, thresholds: Sequence[float] = THRESHOLDS
                ) -> Dict[str, Optional[dict]]:
    """High-contribution area ratios (RepLKNet's ``get_rectangle``).

    For each threshold ``t``, the smallest centred square of side ``2i + 1``
    (``i = 1 .. h//2 - 1``) whose sum exceeds ``t`` times the map's sum.

    Args:
        scaled: a normalised ERF (:func:`normalize_erf`).
        thresholds: shares of the total.

    Returns:
        ``{str(t): {'side': 2i + 1, 'area_ratio': (2i + 1)^2 / (h * w)}}``, ``None`` for a
        threshold no such square reaches.
    """
    h, w = scaled.shape
    total = scaled.sum()
    out = {}
    for t in thresholds:
        out[str(t)] = None
        for i in range(1, h // 2):
            area = scaled[h // 2 - i:h // 2 + i + 1, w // 2 - i:w // 2 + i + 1].sum()
            if total > 0 and area / total > t:
                side = 2 * i + 1
                out[str(t)] = dict(side=side, area_ratio=side / h * side / w)
                break
    return out


def _image_paths(folder: str) -> List[str]:
    if not osp.isdir(folder):
        raise ValueError(f'image folder {folder!r} does not exist')
    paths = sorted(osp.join(root, f) for root, _, files in os.walk(folder) for f in files
                   if f.lower().endswith(IMAGE_SUFFIXES))
    if not paths:
        raise ValueError(f'image folder {folder!r} holds no image ({", ".join(IMAGE_SUFFIXES)})')
    return paths


def load_erf_images(folder: Optional[str], num_images: int, size: int,
                    seed: int = 0) -> Tuple[List[Callable[[], Tensor]], bool]:
    """Images for :func:`compute_erf`, ImageNet-normalised, ``size`` x ``size``, as
    functions that make them (so a resumed run skips images without reading them).

    Args:
        folder: image folder (searched recursively, sorted paths; each image resized so
            its shorter side is ``size``, then centre-cropped), or ``None`` for generated
            images (standard normal noise in the normalised space, image ``i`` seeded
            with ``seed + i``).
        num_images: how many images (the first ones of the folder).
        size: side in pixels.
        seed: seed of the generated images.

    Returns:
        ``(list of functions returning (3, size, size) tensors, generated?)``.
    """
    if num_images < 1:
        raise ValueError(f'num_images must be >= 1, got {num_images}')
    if folder is None:
        return [partial(_noise_image, size, seed + i) for i in range(num_images)], True
    paths = _image_paths(folder)[:num_images]
    return [partial(_read_image, p, size) for p in paths], False


def _noise_image(size: int, seed: int) -> Tensor:
    return torch.randn(3, size, size, generator=torch.Generator().manual_seed(seed))


def _read_image(path: str, size: int) -> Tensor:
    from PIL import Image
    with Image.open(path) as img:
        img = img.convert('RGB')
        scale = size / min(img.size)
        w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
        img = img.resize((w, h), Image.BICUBIC)
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
        x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 255
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def plot_erfs(maps: Mapping[str, np.ndarray], path: str, note: str = '',
              ratios: Optional[Mapping[str, Mapping[str, Optional[dict]]]] = None) -> str:
    """Heatmaps of normalised ERFs side by side (one panel per model).

    Args:
        maps: ``{label: normalised ERF}``.
        path: output PNG.
        note: text under the panels (e.g. which images were used).
        ratios: optional :func:`area_ratios` per label, shown under each panel.
    """
    plt = pyplot()
    n = len(maps)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.4), squeeze=False)
    for ax, (label, data) in zip(axes[0], maps.items()):
        im = ax.imshow(data, cmap='RdYlGn', vmin=0, vmax=1)
        ax.set_title(label, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        if ratios and label in ratios:
            parts = [f't={t}: {r["area_ratio"]:.3f}' if r else f't={t}: -'
                     for t, r in ratios[label].items()]
            text = 'area ratio ' + '  '.join(parts[:2]) + '\n' + '  '.join(parts[2:])
            ax.set_xlabel(text, fontsize=6)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    if note:
        fig.text(0.01, -0.02, note, fontsize=7)
    return save_figure(fig, path)


def run_erf(models: Mapping[str, nn.Module], out_dir: str, image_folder: Optional[str] = None,
            num_images: int = 50, size: int = 1024, layer: Optional[str] = None,
            stage: int = -1, seed: int = 0, progress: bool = True) -> dict:
    """ERF of several models on the same images: ``erf_<label>.npy`` (accumulated),
    ``erf.png`` (normalised heatmaps side by side), ``erf.json`` (area ratios).

    Resumable: each model's partial sum is kept in ``erf_<label>.state.npz`` (see
    :func:`compute_erf`); running the same command again after a kill continues where it
    stopped, and a finished model is not recomputed.

    Args:
        models: ``{label: model}`` (put in eval mode here).
        out_dir: output folder.
        image_folder: images, or ``None`` for generated ones (said on the plot and in the JSON).
        num_images: images per model.
        size: input side in pixels (RepLKNet: 1024).
        layer: module name to analyse (same for all models); ``None``: ``stages.{stage}``.
        stage: stage index when ``layer`` is ``None``.
        seed: seed of generated images.
        progress: progress bar.

    Returns:
        The content of ``erf.json``.
    """
    os.makedirs(out_dir, exist_ok=True)
    maps, ratios, summary = {}, {}, {}
    stems = set()
    for label, model in models.items():
        model.eval()
        name = layer if layer is not None else default_layer(model, stage)
        images, generated = load_erf_images(image_folder, num_images, size, seed)
        count = len(images)
        safe = ''.join(c if c.isalnum() or c in '-_.' else '_' for c in label)
        stem, n = safe, 1
        while safe in stems:  # labels that differ only in replaced characters
            n += 1
            safe = f'{stem}_{n}'
        stems.add(safe)
        # what the partial sum depends on: a changed model or image set starts afresh
        key = json.dumps([label, name, image_folder, count, size, seed,
                          float(sum(p.detach().double().sum() for p in model.parameters()))])
        raw = compute_erf(model, images, name, progress=progress,
                          state_path=osp.join(out_dir, f'erf_{safe}.state.npz'), state_key=key)
        np.save(osp.join(out_dir, f'erf_{safe}.npy'), raw)
        maps[label] = normalize_erf(raw)
        ratios[label] = area_ratios(maps[label])
        summary[label] = dict(layer=name, npy=f'erf_{safe}.npy', area_ratios=ratios[label])
    source = (f'{count} generated images (N(0,1) noise, seed {seed})' if generated
              else f'{count} images from {image_folder}')
    result = dict(images=source, num_images=count, generated_images=generated, size=size,
                  thresholds=list(THRESHOLDS), models=summary)
    plot_erfs(maps, osp.join(out_dir, 'erf.png'),
              note=f'ERF, log10(x+1)/max; {source}; {size}x{size} px', ratios=ratios)
    with open(osp.join(out_dir, 'erf.json'), 'w') as f:
        json.dump(result, f, indent=2)
    return result
