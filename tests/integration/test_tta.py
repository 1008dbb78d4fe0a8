"""Test-time augmentation: ``tools/test.py --tta`` on the detection and segmentation
configs, and :class:`dcls_mm.models.det_tta.DetMaskTTAModel`'s merge of the views."""
import os.path as osp

import pytest
import torch
from mmdet.structures import DetDataSample
from mmengine.config import Config
from mmengine.structures import InstanceData

from dcls_mm.models.det_tta import DetMaskTTAModel

from tests._helpers import load_tool

from .conftest import DEMO_DET, DEMO_SEG, DET_DIR, SEG_DIR, det_data_options

DET_CONFIGS = sorted(osp.join(DET_DIR, name) for name in (
    'cascade-mask-rcnn_convnext-dcls-t_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py',
    'cascade-mask-rcnn_convnext-b_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py',
    'cascade-mask-rcnn_r50-dcls_fpn_ms-3x_coco.py')) + [DEMO_DET]


def _views(cfg):
    """(resize scales, flip probabilities) of a config's TestTimeAug."""
    resize, flip = cfg.tta_pipeline[1]['transforms'][:2]
    return [t['scale'] for t in resize], sorted(t['prob'] for t in flip)


@pytest.mark.parametrize('path', DET_CONFIGS, ids=osp.basename)
def test_detection_configs_have_a_mask_aware_tta(path):
    cfg = Config.fromfile(path)
    assert cfg.tta_model.type == 'dcls_mm.DetMaskTTAModel'
    assert 'dcls_mm.models.det_tta' in cfg.custom_imports.imports
    scales, flips = _views(cfg)
    assert flips == [0., 1.]
    if path == DEMO_DET:  # the demo's TTA fits its ~128 px images
        assert scales == [(128, 80), (160, 96)]
    else:  # mmdet 3's TTA scales around the (1333, 800) test scale
        assert scales == [(1333, 800), (666, 400), (2000, 1200)]


def test_segmentation_demo_tta_fits_the_demo():
    cfg = Config.fromfile(DEMO_SEG)
    scales, flips = _views(cfg)
    # short sides 64 and 96 (the recipe's 0.5..1.75 x (2048, 512) took 24 minutes here)
    assert scales == [(256, 64), (384, 96)] and flips == [0., 1.]
    recipe = Config.fromfile(osp.join(SEG_DIR,
                                      'upernet_convnext-dcls-t_8xb2-amp-160k_ade20k-512x512.py'))
    assert _views(recipe)[0][0] == (1024, 256)


class _Detector(torch.nn.Module):
    """Records the ``flip`` each view shows the detector; predicts nothing."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def test_step(self, data):
        self.seen.append([s.metainfo['flip'] for s in data['data_samples']])
        for s in data['data_samples']:
            s.pred_instances = InstanceData(bboxes=torch.zeros(0, 4), scores=torch.zeros(0),
                                            labels=torch.zeros(0, dtype=torch.long))
        return data['data_samples']


def _instances(boxes, scores, labels, masks):
    return InstanceData(bboxes=torch.tensor(boxes, dtype=torch.float32),
                        scores=torch.tensor(scores), labels=torch.tensor(labels),
                        masks=torch.stack(masks))


def _sample(instances, flip_direction):
    sample = DetDataSample(metainfo=dict(ori_shape=(6, 10), tta_flip_direction=flip_direction))
    sample.pred_instances = instances
    return sample


def test_merge_unflips_boxes_and_masks_and_keeps_each_kept_box_its_mask():
    model = DetMaskTTAModel(module=_Detector(),
                            tta_cfg=dict(nms=dict(type='nms', iou_threshold=0.5),
                                         max_per_img=100))
    left = torch.zeros(6, 10, dtype=torch.bool)
    left[1:4, 0:3] = True  # the object at x 0..3, y 1..4 in the original image
    plain = _instances([[0., 1., 3., 4.]], [0.6], [2], [left])
    # the flipped view (width 10) saw it at x 7..10, mask mirrored; higher score
    flipped = _instances([[7., 1., 10., 4.], [4., 4., 6., 6.]], [0.9, 0.3], [2, 1],
                         [left.flip(-1), torch.zeros(6, 10, dtype=torch.bool)])
    merged = model.merge_preds([[_sample(plain, None), _sample(flipped, 'horizontal')]])
    out = merged[0].pred_instances
    # the two views of the object overlap exactly once flipped back: NMS keeps the 0.9
    # one, whose box and mask are now in the original frame; the other class stays
    assert out.scores.tolist() == pytest.approx([0.9, 0.3])
    assert out.bboxes.tolist() == [[0., 1., 3., 4.], [4., 4., 6., 6.]]
    assert out.labels.tolist() == [2, 1]
    assert torch.equal(out.masks[0], left) and not out.masks[1].any()


def test_tta_flags_flipped_views_and_hides_the_flip_from_the_detector():
    detector = _Detector()
    model = DetMaskTTAModel(module=detector,
                            tta_cfg=dict(nms=dict(iou_threshold=0.5), max_per_img=10))
    views = [[DetDataSample(metainfo=dict(ori_shape=(4, 4), flip=flip,
                                          flip_direction='horizontal'))] for flip in (False, True)]
    merged = model.test_step(dict(inputs=[[torch.zeros(3, 4, 4)]] * 2, data_samples=views))
    assert detector.seen == [[False], [False]]
    assert [v[0].metainfo['tta_flip_direction'] for v in views] == [None, 'horizontal']
    assert len(merged) == 1 and len(merged[0].pred_instances) == 0


@pytest.fixture(scope='module')
def untrained_demo_detector(tmp_path_factory):
    """A checkpoint of the demo detector as built (its weights do not matter here)."""
    from mmengine.registry import MODELS, init_default_scope
    import dcls_mm.models  # noqa: F401
    cfg = Config.fromfile(DEMO_DET)
    init_default_scope('mmdet')
    path = str(tmp_path_factory.mktemp('tta') / 'untrained.pth')
    torch.save({'state_dict': MODELS.build(cfg.model).state_dict()}, path)
    return path


def test_tools_test_tta_on_the_demo_detector(coco_demo, untrained_demo_detector, tmp_path):
    test_tool = load_tool('tools/test.py')
    options = [f'{k}={v}' for k, v in det_data_options(coco_demo).items()]
    metrics = test_tool.main([DEMO_DET, untrained_demo_detector, '--tta',
                              '--work-dir', str(tmp_path), '--cfg-options', *options,
                              # fewer boxes per view: an untrained detector's 100 masks
                              # per view are pasted for nothing
                              'model.test_cfg.rcnn.max_per_img=10', 'log_level=WARNING'])
    # boxes and masks both reach the COCO metric through the TTA model
    assert {'coco/bbox_mAP', 'coco/segm_mAP'} <= set(metrics)
