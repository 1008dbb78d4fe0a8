"""dcls_mm.datasets: tiny demo data in the real COCO / ADE20K on-disk formats.

Pure numpy/PIL (pycocotools for COCO areas); no OpenMMLab import.
"""
from .demo import (ADE20K_DEMO_CLASS_IDS, ADE20K_DEMO_CLASSES, ADE20K_DEMO_PALETTE,
                   COCO_DEMO_CATEGORIES, COCO_DEMO_CLASSES, make_ade20k_demo, make_coco_demo)

__all__ = [
    'make_coco_demo', 'make_ade20k_demo', 'COCO_DEMO_CATEGORIES', 'COCO_DEMO_CLASSES',
    'ADE20K_DEMO_CLASS_IDS', 'ADE20K_DEMO_CLASSES', 'ADE20K_DEMO_PALETTE'
]
