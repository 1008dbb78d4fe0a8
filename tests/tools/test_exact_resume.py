"""Issue 15 item 4 on the demo detector (Cascade Mask R-CNN, ConvNeXt-dcls-atto, real
COCO-format data): 4 straight iterations == 2 + ``tools/train.py --resume`` + 2, bit for
bit on the CPU (parameters, optimizer state and every logged loss)."""
import torch

from tests._helpers import load_tool
from tests.tools.test_tools import DEMO_DET


def _train_tool():
    return load_tool('tools/train.py')


def _losses(runner):
    return {k: list(v.data[0]) for k, v in runner.message_hub.log_scalars.items()
            if k.startswith('train/loss')}


def test_demo_detector_two_iterations_resume_two_equals_four(tmp_path, one_thread):
    from dcls_mm.datasets import make_coco_demo
    data = make_coco_demo(str(tmp_path / 'coco'), num_images=4, num_val_images=1,
                          image_size=(96, 64))
    # 4 images, batch 1: one epoch of 4 iterations; a checkpoint every 2 (mid-epoch)
    options = ['--cfg-options', f'train_dataloader.dataset.data_root={data["data_root"]}/',
               'train_dataloader.batch_size=1',
               'val_cfg=None', 'val_dataloader=None', 'val_evaluator=None',
               'default_hooks.checkpoint.by_epoch=False', 'default_hooks.checkpoint.interval=2',
               'log_level=WARNING']
    train = _train_tool()
    straight = train.main([DEMO_DET, '--work-dir', str(tmp_path / 'a')] + options)
    assert straight.iter == 4
    resumed = train.main([DEMO_DET, '--work-dir', str(tmp_path / 'b'), '--resume',
                          str(tmp_path / 'a' / 'iter_2.pth')] + options)
    assert resumed.iter == 4
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    opt_a = straight.optim_wrapper.state_dict()['state']
    opt_b = resumed.optim_wrapper.state_dict()['state']
    for i in opt_a:
        for k in opt_a[i]:
            assert torch.equal(torch.as_tensor(opt_a[i][k]), torch.as_tensor(opt_b[i][k]))
    # the loss history (iterations 1-2 come from the checkpoint, 3-4 from the resumed run)
    losses_a, losses_b = _losses(straight), _losses(resumed)
    assert losses_a.keys() == losses_b.keys() and len(losses_a['train/loss']) == 4
    assert losses_a == losses_b
