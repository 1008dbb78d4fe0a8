"""Loading a checkpoint never runs code from it, through any entry point, whatever the
file format (raw pickle of any protocol, torch's legacy format, torch's zip format);
unreadable files get one clear line naming the file and the problem."""
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from dcls_mm.models import ConvNeXtDCLS
from dcls_mm.utils.checkpoint_io import (CheckpointReadError, UnsafeCheckpointError,
                                         load_checkpoint_file)

from tests._helpers import ROOT

from ._synthetic import SMALL_ARCH, random_backbone_state



class _OsSystem:
    """The issue's exploit: ``os.system('touch MARKER')`` at unpickling time."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))


class _Exec:
    """A payload through a module torch does not block by name (builtins.exec)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f'open({self.marker!r}, "w").write("x")',))


class _NumpyFunctionCall:
    """numpy is partly allowed for training checkpoints: its other functions are not."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import numpy.testing._private.utils as np_utils
        return (np_utils.runstring, (f'open({self.marker!r}, "w").write("x")', {}))


class _GetattrEscape:
    """``getattr`` is allowed only for HistoryBuffer's statistics methods."""

    def __reduce__(self):
        from mmengine.logging import HistoryBuffer
        return (getattr, (HistoryBuffer, '__init__'))


def _raw_pickle(path, payload, protocol):
    with open(path, 'wb') as f:
        pickle.dump(payload, f, protocol=protocol)


def _torch_legacy(path, payload, protocol):
    torch.save({'state_dict': {'w': torch.ones(1)}, 'x': payload}, path,
               _use_new_zipfile_serialization=False, pickle_protocol=protocol)


def _torch_zip(path, payload, protocol):
    torch.save({'state_dict': {'w': torch.ones(1)}, 'x': payload}, path,
               pickle_protocol=protocol)


WRITERS = {'raw-pickle': _raw_pickle, 'torch-legacy': _torch_legacy, 'torch-zip': _torch_zip}


def _write_evil(tmp_path, writer='raw-pickle', payload_cls=_OsSystem, protocol=2):
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pth'
    payload = payload_cls(marker) if payload_cls is not _GetattrEscape else payload_cls()
    WRITERS[writer](path, payload, protocol)
    return path, marker


@pytest.mark.filterwarnings('ignore:Detected pickle protocol')
@pytest.mark.parametrize('writer', sorted(WRITERS))
@pytest.mark.parametrize('protocol', range(pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize('payload_cls', [_OsSystem, _Exec])
def test_crafted_files_run_nothing(tmp_path, writer, protocol, payload_cls):
    if writer != 'raw-pickle' and protocol < 2:
        pytest.skip('torch.save needs pickle protocol >= 2')
    path, marker = _write_evil(tmp_path, writer, payload_cls, protocol)
    with pytest.raises(UnsafeCheckpointError, match='refusing to unpickle') as info:
        load_checkpoint_file(str(path))
    assert str(path) in str(info.value)
    assert '\n' not in str(info.value)
    assert not marker.exists()
    # torch's own reader refuses the same file (the reference behaviour we keep)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    assert not marker.exists()


@pytest.mark.parametrize('payload_cls', [_NumpyFunctionCall, _GetattrEscape])
def test_training_checkpoint_allow_list_is_exact(tmp_path, payload_cls):
    path, marker = _write_evil(tmp_path, 'torch-zip', payload_cls)
    with pytest.raises(pickle.UnpicklingError):  # UnsafeCheckpointError is one
        load_checkpoint_file(str(path))
    assert not marker.exists()


def test_training_checkpoint_with_history_and_numpy_loads(tmp_path):
    from mmengine.logging import MessageHub
    hub = MessageHub('security_test')
    for v in (1.0, 3.0):
        hub.update_scalar('train/loss', v)
    hub.update_info('np', np.arange(3, dtype=np.float64))
    hub.update_info('np_scalar', np.float32(2.5))
    path = tmp_path / 'epoch_1.pth'
    torch.save({'meta': {'epoch': 1, 'seed': np.int64(3)}, 'state_dict': {'w': torch.ones(2)},
                'message_hub': hub.state_dict()}, path)
    ckpt = load_checkpoint_file(str(path))
    buf = ckpt['message_hub']['log_scalars']['train/loss']
    assert buf.mean() == pytest.approx(2.0) and buf.max() == 3.0
    np.testing.assert_array_equal(ckpt['message_hub']['runtime_info']['np'], np.arange(3.0))
    assert ckpt['message_hub']['runtime_info']['np_scalar'] == np.float32(2.5)
    assert ckpt['meta']['seed'] == 3


def test_entry_point_pretrained_init_cfg(tmp_path):
    path, marker = _write_evil(tmp_path, 'torch-legacy')
    model = ConvNeXtDCLS(SMALL_ARCH, kernel_count=5, dilated_kernel_size=7,
                         init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    with pytest.raises(UnsafeCheckpointError):
        model.init_weights()
    assert not marker.exists()


def test_entry_point_mmengine_checkpoint_loader(tmp_path):
    from mmengine.runner.checkpoint import CheckpointLoader

    from dcls_mm.engine import register_checkpoint_loader
    register_checkpoint_loader()  # routes local files through the checked reader
    path, marker = _write_evil(tmp_path, 'raw-pickle')
    with pytest.raises(UnsafeCheckpointError):
        CheckpointLoader.load_checkpoint(str(path))
    assert not marker.exists()


def _run_tool(args, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


def test_entry_point_converter(tmp_path):
    path, marker = _write_evil(tmp_path, 'raw-pickle')
    out = _run_tool([str(ROOT / 'tools/model_converters/convert_convnext_dcls.py'),
                     str(path), str(tmp_path / 'out.pth')], tmp_path)
    assert out.returncode != 0
    assert 'refusing to unpickle' in out.stderr
    assert not marker.exists()


@pytest.mark.parametrize('how', ['test', 'resume'])
def test_entry_point_train_and_test_tools(tmp_path, how):
    from dcls_mm.datasets import make_coco_demo
    path, marker = _write_evil(tmp_path, 'raw-pickle')
    config = str(ROOT / 'configs/demo/cascade-mask-rcnn_convnext-dcls-atto_fpn_4conv1fc-giou_ms-crop-1e_demo-coco.py')
    data = make_coco_demo(str(tmp_path / 'coco'), num_images=1, num_val_images=1,
                          image_size=(64, 48))
    options = ['--cfg-options'] + [f'{s}_dataloader.dataset.data_root={data["data_root"]}'
                                   for s in ('train', 'val', 'test')] + [
        f'{s}_evaluator.ann_file={data["data_root"]}/{data["val_ann"]}' for s in ('val', 'test')]
    if how == 'test':
        args = [str(ROOT / 'tools/test.py'), config, str(path)]
    else:
        args = [str(ROOT / 'tools/train.py'), config, '--resume', str(path)]
    out = _run_tool(args + ['--work-dir', str(tmp_path / 'wd')] + options, tmp_path)
    assert out.returncode != 0
    assert 'refusing to unpickle' in out.stderr + out.stdout
    assert not marker.exists()


# --- unreadable files: one line naming the file and the problem -------------------------
def _good_file(tmp_path):
    path = tmp_path / 'good.pth'
    torch.save({'state_dict': random_backbone_state(SMALL_ARCH['depths'], SMALL_ARCH['dims'],
                                                    5, 7)}, path)
    return path


def _check_one_line(error, path, *fragments):
    text = str(error.value)
    assert '\n' not in text and str(path) in text, text
    for fragment in fragments:
        assert fragment in text, text


def test_empty_file(tmp_path):
    path = tmp_path / 'empty.pth'
    path.write_bytes(b'')
    with pytest.raises(CheckpointReadError) as info:
        load_checkpoint_file(str(path))
    _check_one_line(info, path, 'empty')


@pytest.mark.parametrize('legacy', [False, True])
@pytest.mark.parametrize('fraction', [0.1, 0.5, 0.9])
def test_truncated_file(tmp_path, legacy, fraction):
    path = _good_file(tmp_path)
    if legacy:
        ckpt = torch.load(path, weights_only=True)
        torch.save(ckpt, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * fraction)])
    with pytest.raises(CheckpointReadError) as info:
        load_checkpoint_file(str(path))
    _check_one_line(info, path, 'not a readable PyTorch checkpoint')
    assert not isinstance(info.value, UnsafeCheckpointError)


def test_zip_that_is_not_a_torch_file(tmp_path):
    path = tmp_path / 'archive.pth'
    with zipfile.ZipFile(path, 'w') as z:
        z.writestr('readme.txt', 'not a checkpoint')
    with pytest.raises(CheckpointReadError) as info:
        load_checkpoint_file(str(path))
    _check_one_line(info, path, 'not a readable PyTorch checkpoint')


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        load_checkpoint_file(str(tmp_path / 'nope.pth'))


@pytest.mark.parametrize('wrapper', ['state_dict', 'model', None])
def test_non_finite_weights_are_refused_naming_the_keys(tmp_path, wrapper):
    sd = random_backbone_state(SMALL_ARCH['depths'], SMALL_ARCH['dims'], 5, 7)
    sd['stages.0.0.dwconv.P'][0, 0, 0, 1] = float('nan')
    sd['stages.1.0.gamma'][3] = float('inf')
    path = tmp_path / 'nan.pth'
    torch.save(sd if wrapper is None else {wrapper: sd}, path)
    with pytest.raises(CheckpointReadError) as info:
        load_checkpoint_file(str(path))
    _check_one_line(info, path, 'NaN or Inf', '2 tensor(s)', 'stages.0.0.dwconv.P',
                    'stages.1.0.gamma')
    # the same file through the backbone's init_cfg: refused before any forward
    model = ConvNeXtDCLS(SMALL_ARCH, kernel_count=5, dilated_kernel_size=7,
                         init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    with pytest.raises(CheckpointReadError, match='NaN or Inf'):
        model.init_weights()


def test_safe_reader_is_independent_of_the_models():
    """The reader sits with the I/O helpers: importing it loads no model code (the models
    build on it), so any layer of the package and any tool can use it."""
    probe = ('import sys, dcls_mm.utils.checkpoint_io; '
             "print(sorted(m for m in sys.modules if m.startswith('dcls_mm.models')))")
    out = subprocess.run([sys.executable, '-c', probe], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == '[]'
