"""Test-time augmentation for instance segmentation (boxes and masks).

mmdet 3.3's ``DetTTAModel`` merges boxes only: it asserts that the predictions hold no
masks ("TTA of instance segmentation does not support now"), and a flipped view makes
``CascadeRoIHead.predict_mask`` fail before that (its ``merge_aug_masks`` slices a tensor
with a negative step). :class:`DetMaskTTAModel` hides the flip from the detector, undoes
it on the full-image predictions, and keeps the mask of every box that survives the
class-wise NMS over all views.

Not imported by ``dcls_mm.models`` (it is only needed with ``--tta``): the detection
configs list ``dcls_mm.models.det_tta`` in their ``custom_imports``.
"""
from __future__ import annotations

import torch
from mmengine.model import BaseTTAModel
from mmengine.structures import InstanceData
from torchvision.ops import batched_nms

from ..registry import MODELS

#: the metainfo key that keeps a view's flip direction while the detector sees none
_FLIP_KEY = 'tta_flip_direction'


def _unflip(instances: InstanceData, direction: str | None, height: int,
            width: int) -> InstanceData:
    """Map one view's predictions (original image size, flipped frame) back."""
    if direction is None:
        return instances
    if direction not in ('horizontal', 'vertical', 'diagonal'):
        raise ValueError(f'unknown flip direction {direction!r}')
    boxes = instances.bboxes.clone()
    masks = instances.get('masks')
    if direction in ('horizontal', 'diagonal'):
        boxes[:, [0, 2]] = width - instances.bboxes[:, [2, 0]]
        masks = masks.flip(-1) if masks is not None else None
    if direction in ('vertical', 'diagonal'):
        boxes[:, [1, 3]] = height - instances.bboxes[:, [3, 1]]
        masks = masks.flip(-2) if masks is not None else None
    out = instances.clone()
    out.bboxes = boxes
    if masks is not None:
        out.masks = masks
    return out


@MODELS.register_module()
class DetMaskTTAModel(BaseTTAModel):
    """Merge the views of a multi-scale + flip test of a detector, masks included.

    The views' predictions (already rescaled to the original image by the detector) are
    flipped back, pooled, and reduced by class-wise NMS; each kept box keeps its own
    mask and score. Without masks this is mmdet's ``DetTTAModel``.

    Args:
        tta_cfg: ``dict(nms=dict(iou_threshold=...), max_per_img=...)``, as for mmdet's
            ``DetTTAModel`` (only ``nms.iou_threshold`` is read from ``nms``).
        **kwargs: ``module`` (the detector) and ``data_preprocessor``, passed to
            :class:`mmengine.model.BaseTTAModel`.
    """

    def __init__(self, tta_cfg: dict, **kwargs) -> None:
        super().__init__(**kwargs)
        self.iou_threshold = float(tta_cfg['nms']['iou_threshold'])
        self.max_per_img = int(tta_cfg['max_per_img'])

    def test_step(self, data: dict) -> list:
        """Run every view with its flip hidden from the detector, then merge."""
        for view in data['data_samples']:
            for sample in view:
                flipped = sample.metainfo.get('flip', False)
                sample.set_metainfo({
                    _FLIP_KEY: sample.metainfo.get('flip_direction') if flipped else None,
                    'flip': False})
        return super().test_step(data)

    def merge_preds(self, data_samples_list: list[list]) -> list:
        """One merged sample per image from the list of its views' samples."""
        return [self._merge_views(views) for views in data_samples_list]

    def _merge_views(self, views: list):
        height, width = views[0].metainfo['ori_shape'][:2]
        pooled = InstanceData.cat([
            _unflip(view.pred_instances, view.metainfo[_FLIP_KEY], height, width)
            for view in views])
        merged = views[0]
        if len(pooled) == 0:
            merged.pred_instances = pooled
            return merged
        keep = batched_nms(pooled.bboxes.float(), pooled.scores.float(), pooled.labels,
                           self.iou_threshold)[:self.max_per_img]
        merged.pred_instances = pooled[keep]
        return merged
