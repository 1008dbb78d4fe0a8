"""Tiny benchmark folders in the real layouts, a seeded tiny timm model saved as a plain
timm checkpoint, and an independent per-image reference evaluation (a plain loop).

A random model gets every label wrong on random images, which would make "0 % = 0 %" a
weak check. So after writing a set, every other image is moved into the class folder of
the class the reference predicts for it, the others into a class it does not predict:
the tool must then find exactly the right half.
"""
import os
import os.path as osp
import pkgutil
import shutil

import numpy as np
import torch
from PIL import Image

from dcls_mm.datasets.imagenet_layouts import (synthetic_images, write_class_folder,
                                               write_corruption_folders)

MODEL = 'test_resnet'
# a few ImageNet-1k wnids that are also ImageNet-A and -R classes (initial folders)
WNIDS = ('n01498041', 'n01531178', 'n01614925')
C_SETS = {'gaussian_noise': (1, 2), 'fog': (3,)}
CATEGORIES = {'gaussian_noise': 'noise', 'fog': 'weather'}
C_BAR = {'caustic_refraction': (('2.35', 1), ('9.15', 5))}


def _info(name):
    return pkgutil.get_data('timm.data', f'_info/{name}').decode().split()


def add_noise(image, corruption, severity, seed):
    rng = np.random.default_rng(seed)
    return np.clip(image + rng.normal(0, 12 * severity, image.shape), 0, 255).astype(np.uint8)


def save_model_checkpoint(path: str, seed: int = 0, wrap: str = 'state_dict') -> str:
    import timm
    torch.manual_seed(seed)
    model = timm.create_model(MODEL)
    torch.save({wrap: model.state_dict()}, path)
    return path


class Reference:
    """The model of ``checkpoint`` evaluated image by image: PIL decode, timm's full eval
    transform (or ToTensor + Normalize at native size), batch of one, float32 NCHW."""

    def __init__(self, checkpoint: str):
        import timm
        from timm.data import create_transform, resolve_data_config
        self.model = timm.create_model(MODEL)
        self.model.load_state_dict(torch.load(checkpoint, weights_only=True)['state_dict'])
        self.model.eval()
        cfg = resolve_data_config({}, model=self.model)
        self.transform = create_transform(**cfg)
        self.mean = torch.tensor(cfg['mean']).view(3, 1, 1)
        self.std = torch.tensor(cfg['std']).view(3, 1, 1)

    def ranking(self, path: str, native: bool, class_indices=None):
        """Class labels (ImageNet-1k index, or position in ``class_indices``), best first."""
        img = Image.open(path).convert('RGB')
        if native:
            x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255
            x = (x - self.mean) / self.std
        else:
            x = self.transform(img)
        with torch.no_grad():
            logits = self.model(x[None])[0]
        if class_indices is not None:
            logits = logits[list(class_indices)]
        return sorted(range(len(logits)), key=lambda i: -float(logits[i]))

    def counts(self, files, native: bool, class_indices=None):
        """(top-1 hits, top-5 hits, n) over ``(path, label)`` pairs."""
        top1 = top5 = 0
        for path, label in files:
            order = self.ranking(path, native, class_indices)
            top1 += order[0] == label
            top5 += label in order[:5]
        return top1, top5, len(files)


def reference_files(folder: str, subset: str = None):
    """``(path, label)`` of ``folder/<wnid>/*`` with labels read straight from timm's
    ``_info`` lists (ImageNet-1k index, or position in the A/R list), and the A/R logit
    indices (``None`` for the 1000 classes)."""
    if subset:
        wnids = _info(f'imagenet_{subset}_synsets.txt')
        indices = [int(i) for i in _info(f'imagenet_{subset}_indices.txt')]
    else:
        wnids, indices = _info('imagenet_synsets.txt'), None
    files = [(osp.join(folder, w, f), wnids.index(w)) for w in sorted(os.listdir(folder))
             for f in sorted(os.listdir(osp.join(folder, w)))]
    return files, indices


def _place_by_prediction(folder: str, ref: Reference, native: bool, subset: str = None):
    """Move even-numbered images into their predicted class folder, odd ones into a
    class that is not their top-1 (nor in their top 5)."""
    files, indices = reference_files(folder, subset)
    wnids = _info(f'imagenet_{subset}_synsets.txt') if subset else _info('imagenet_synsets.txt')
    for i, (path, _) in enumerate(files):
        order = ref.ranking(path, native, indices)
        target = wnids[order[0] if i % 2 == 0 else order[-1]]
        os.makedirs(osp.join(folder, target), exist_ok=True)
        shutil.move(path, osp.join(folder, target, f'{i:03d}_{osp.basename(path)}'))
    for w in os.listdir(folder):
        if not os.listdir(osp.join(folder, w)):
            os.rmdir(osp.join(folder, w))


def build_data_root(root: str, checkpoint: str) -> str:
    """``root`` with imagenet/val, imagenet-c (with category folders), imagenet-c-bar
    (parameter-named severities), imagenet-a, imagenet-r (PNG) and sketch, each image
    placed by the prediction of ``checkpoint``'s model (see the module docstring)."""
    ref = Reference(checkpoint)
    class_sets = (('imagenet/val', None, 2, 40, '.JPEG'), ('imagenet-a', 'a', 2, 56, '.JPEG'),
                  ('imagenet-r', 'r', 1, 48, '.png'), ('sketch', None, 2, 44, '.JPEG'))
    for seed, (name, subset, per_class, size, ext) in enumerate(class_sets):
        folder = osp.join(root, name)
        write_class_folder(folder, synthetic_images(WNIDS, per_class, size, seed=seed), ext=ext)
        _place_by_prediction(folder, ref, native=False, subset=subset)
    native = synthetic_images(WNIDS, per_class=1, size=32, seed=5)
    for corruption, severities in C_SETS.items():
        for sev, folder in write_corruption_folders(
                osp.join(root, 'imagenet-c'), native, [corruption], severities,
                corrupt=add_noise, categories=CATEGORIES)[corruption].items():
            _place_by_prediction(folder, ref, native=True)
    for corruption, named in C_BAR.items():
        names = {s: n for n, s in named}
        for sev, folder in write_corruption_folders(
                osp.join(root, 'imagenet-c-bar'), native, [corruption], [s for _, s in named],
                corrupt=add_noise,
                severity_names={corruption: [names.get(s, str(s)) for s in range(1, 6)]}
        )[corruption].items():
            _place_by_prediction(folder, ref, native=True)
    return root

