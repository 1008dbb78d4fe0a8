"""dcls_mm.datasets: tiny demo data in the real COCO / ADE20K on-disk formats, and the
ImageNet-C image corruptions.

Pure numpy/PIL/OpenCV/SciPy/scikit-image (pycocotools for COCO areas); never imports
mmdet or mmseg.
"""
from .corruptions import CORRUPTION_SUBSETS, corrupt, corruption_names, image_seed
from .demo import (ADE20K_DEMO_CLASS_IDS, ADE20K_DEMO_CLASSES, ADE20K_DEMO_PALETTE,
                   COCO_DEMO_CATEGORIES, COCO_DEMO_CLASSES, make_ade20k_demo, make_coco_demo)
from .transforms import Corrupt  # registers dcls_mm.Corrupt (MMCV/MMEngine only)

__all__ = [
    'corrupt', 'corruption_names', 'image_seed', 'CORRUPTION_SUBSETS', 'Corrupt',
    'make_coco_demo', 'make_ade20k_demo', 'COCO_DEMO_CATEGORIES', 'COCO_DEMO_CLASSES',
    'ADE20K_DEMO_CLASS_IDS', 'ADE20K_DEMO_CLASSES', 'ADE20K_DEMO_PALETTE'
]
