"""Loading a checkpoint never runs code from it (torch >= 2.6 weights_only semantics kept
for mmengine training checkpoints)."""
import pickle

import pytest
import torch

from dcls_mm.models.checkpoint import load_checkpoint_file


def _save_with(tmp_path, obj):
    path = tmp_path / 'ckpt.pth'
    torch.save({'state_dict': {'w': torch.ones(1)}, 'extra': obj}, path)
    return str(path)


class _NumpyFunctionCall:
    def __reduce__(self):
        import numpy.testing._private.utils as np_utils
        return (np_utils.runstring, ("open('/tmp/dcls_mm_pwned', 'w').write('x')", {}))


class _GetattrEscape:
    def __reduce__(self):
        from mmengine.logging import HistoryBuffer
        return (getattr, (HistoryBuffer, '__init__'))


@pytest.mark.parametrize('payload', [_NumpyFunctionCall(), _GetattrEscape()])
def test_crafted_pickles_are_refused(tmp_path, payload):
    path = _save_with(tmp_path, payload)
    with pytest.raises(pickle.UnpicklingError, match='refusing'):
        load_checkpoint_file(path)
    import os
    assert not os.path.exists('/tmp/dcls_mm_pwned')


def test_training_checkpoint_with_history_and_numpy_loads(tmp_path):
    import numpy as np
    from mmengine.logging import MessageHub
    hub = MessageHub('security_test')
    for v in (1.0, 3.0):
        hub.update_scalar('train/loss', v)
    hub.update_info('np', np.arange(3, dtype=np.float64))
    path = tmp_path / 'epoch_1.pth'
    torch.save({'meta': {'epoch': 1}, 'state_dict': {'w': torch.ones(2)},
                'message_hub': hub.state_dict()}, path)
    ckpt = load_checkpoint_file(str(path))
    buf = ckpt['message_hub']['log_scalars']['train/loss']
    assert buf.mean() == pytest.approx(2.0) and buf.max() == 3.0
    np.testing.assert_array_equal(ckpt['message_hub']['runtime_info']['np'], np.arange(3.0))
