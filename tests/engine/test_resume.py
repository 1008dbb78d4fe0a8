"""Issue 15 items 4 and 5 with real mmengine Runners on a toy model whose data pipeline
and forward use every global generator (Python, NumPy, torch): k iterations + resume ==
a straight run, bit for bit; atomic checkpoint files; resume past a truncated one."""
import itertools
import os
import os.path as osp
import random

import numpy as np
import pytest
import torch
from mmengine.evaluator import BaseMetric
from mmengine.model import BaseModel
from torch import nn

import dcls_mm.engine  # noqa: F401  (registers the hooks)
from dcls_mm.engine.hooks import find_resumable_checkpoint, get_rng_state, set_rng_state
from dcls_mm.utils.fileio import atomic_write

_names = itertools.count()


class RandomAugmentDataset(torch.utils.data.Dataset):
    """8 samples; each fetch draws from Python's, NumPy's and torch's global generators."""

    metainfo = dict(classes=('a', ))

    def __len__(self):
        return 8

    def __getitem__(self, index):
        x = torch.full((4, ), float(index))
        x = x + random.random() + float(np.random.rand()) + torch.rand(4)
        return dict(inputs=x)


class DropoutModel(BaseModel):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.5)

    def forward(self, inputs, data_samples=None, mode='loss'):
        x = self.drop(self.fc(torch.stack(inputs)))
        if mode == 'loss':
            return dict(loss=(x ** 2).mean())
        return [dict(score=float(v)) for v in x.sum(1)]  # 'predict': dropout in eval is off


class MeanScore(BaseMetric):
    def process(self, data_batch, data_samples):
        self.results.extend(s['score'] for s in data_samples)

    def compute_metrics(self, results):
        return dict(score=sum(results) / len(results))


def _run(work_dir, loop, max_len, resume=None, ckpt_interval=1, rng_hook=True, seed=None,
         val=False, ckpt_by_epoch=False):
    from mmengine.evaluator import Evaluator
    from mmengine.runner import Runner
    train_cfg = (dict(by_epoch=True, max_epochs=max_len) if loop == 'epoch' else
                 dict(type='IterBasedTrainLoop', max_iters=max_len, val_interval=3))
    loader = dict(dataset=RandomAugmentDataset(), batch_size=2, num_workers=0,
                  sampler=dict(type='DefaultSampler', shuffle=True))
    runner = Runner(
        model=DropoutModel(), work_dir=str(work_dir), experiment_name=f'resume{next(_names)}',
        train_dataloader=loader,
        # validation draws from every generator too (its pipeline and its loader's seed)
        val_dataloader=dict(loader, sampler=dict(type='DefaultSampler', shuffle=False))
        if val else None, val_cfg=dict() if val else None,
        val_evaluator=Evaluator([MeanScore()]) if val else None,
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1, momentum=0.9)),
        train_cfg=train_cfg,
        default_hooks=dict(checkpoint=dict(type='dcls_mm.AtomicCheckpointHook',
                                           interval=ckpt_interval, by_epoch=ckpt_by_epoch),
                           logger=dict(type='LoggerHook', interval=100)),
        custom_hooks=[dict(type='dcls_mm.RNGStateHook')] if rng_hook else [],
        randomness=dict(seed=seed), resume=resume is not None,
        load_from=None if resume in (None, 'auto') else resume, log_level='WARNING')
    runner.train()
    return runner


def _params(runner):
    return {k: v.clone() for k, v in runner.model.state_dict().items()}


def _assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize('loop,max_len,resume_at,seed', [
    ('epoch', 2, 3, 0),     # mid-epoch: 3 of the 4 batches of epoch 0 done
    ('epoch', 2, 4, None),  # epoch boundary; no fixed seed (mmengine draws one per run)
    ('iter', 6, 3, 0),      # iteration-based loop (mmengine re-fetches the 3 batches)
])
def test_resumed_run_equals_straight_run_bit_for_bit(tmp_path, loop, max_len, resume_at, seed):
    straight = _params(_run(tmp_path / 'a', loop, max_len, seed=seed))
    ckpt = str(tmp_path / 'a' / f'iter_{resume_at}.pth')
    resumed = _params(_run(tmp_path / 'b', loop, max_len, resume=ckpt, seed=seed))
    _assert_bitwise_equal(straight, resumed)


@pytest.mark.parametrize('loop,max_len,ckpt,by_epoch', [
    ('epoch', 3, 'iter_4.pth', False),   # saved before the epoch's validation
    ('epoch', 3, 'epoch_1.pth', True),   # saved at the end of the epoch
    ('iter', 7, 'iter_3.pth', False),    # saved before a validation (val_interval 3)
])
def test_validation_between_checkpoint_and_next_iteration(tmp_path, loop, max_len, ckpt,
                                                          by_epoch):
    """The straight run validates after the checkpoint, the resumed one does not repeat
    it: validation must not shift the training stream."""
    kwargs = dict(val=True, seed=0, ckpt_by_epoch=by_epoch)
    straight = _params(_run(tmp_path / 'a', loop, max_len, **kwargs))
    resumed = _params(_run(tmp_path / 'b', loop, max_len, resume=str(tmp_path / 'a' / ckpt),
                           **kwargs))
    _assert_bitwise_equal(straight, resumed)


def test_without_the_hook_resume_is_not_exact(tmp_path):
    """Control: the comparison above can fail (mmengine alone re-seeds and restarts the
    interrupted epoch)."""
    straight = _params(_run(tmp_path / 'a', 'epoch', 2, rng_hook=False, seed=0))
    resumed = _params(_run(tmp_path / 'b', 'epoch', 2, resume=str(tmp_path / 'a/iter_3.pth'),
                           rng_hook=False, seed=0))
    assert any(not torch.equal(straight[k], resumed[k]) for k in straight)


def test_rng_state_roundtrip_and_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    np.random.randn()  # leaves a cached gaussian in NumPy's state
    state = get_rng_state()
    expected = (random.random(), np.random.randn(), torch.rand(3))
    path = str(tmp_path / 'state.pth')
    torch.save(state, path)
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    set_rng_state(torch.load(path, weights_only=True))  # plain values and tensors only
    got = (random.random(), np.random.randn(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / 'ckpt.pth'
    atomic_write(path, b'old')

    def killed(fd):  # the process dies after writing, before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(os, 'fsync', killed)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, b'new' * 1000)
    monkeypatch.undo()
    assert path.read_bytes() == b'old'
    assert os.listdir(tmp_path) == ['ckpt.pth']  # no temporary file left behind
    atomic_write(path, b'new')
    assert path.read_bytes() == b'new'


def test_atomic_files_get_the_umask_mode_and_leave_no_descriptor(tmp_path):
    """mkstemp's 0600 once stayed on every checkpoint, record and result file: other
    users of a shared machine could not read them. A failed open leaked its descriptor."""
    from dcls_mm.utils.fileio import atomic_open
    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / 'a.pth', b'x')
        plain = tmp_path / 'b.pth'
        plain.write_bytes(b'x')  # what open() gives
        assert (tmp_path / 'a.pth').stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)
    fds = len(os.listdir('/proc/self/fd'))
    for _ in range(5):
        with pytest.raises(TypeError):
            with atomic_open(tmp_path / 'c.txt', 'w', bogus=1):
                pass
    assert len(os.listdir('/proc/self/fd')) == fds
    assert sorted(os.listdir(tmp_path)) == ['a.pth', 'b.pth']


def _truncate(path, keep=0.5):
    data = open(path, 'rb').read()
    with open(path, 'wb') as f:
        f.write(data[:int(len(data) * keep)])


def test_checkpoints_are_written_through_a_temporary_file(tmp_path, monkeypatch):
    """mmengine's CheckpointHook writes in place; ours renames a complete temporary file."""
    renames = []
    real_replace = os.replace
    monkeypatch.setattr(os, 'replace', lambda a, b: (renames.append((a, b)), real_replace(a, b)))
    _run(tmp_path / 'a', 'iter', 2)
    targets = [osp.basename(b) for _, b in renames]
    assert 'iter_1.pth' in targets and 'iter_2.pth' in targets
    assert all(osp.dirname(a) == osp.dirname(b) for a, b in renames)


@pytest.mark.parametrize('how', ['named', 'last_checkpoint'])
def test_resume_falls_back_to_the_newest_complete_checkpoint(tmp_path, how, capsys):
    straight = _params(_run(tmp_path / 'a', 'iter', 4, seed=0))
    work = tmp_path / 'a'
    _truncate(work / 'iter_4.pth')
    # iter_3.pth is the newest complete one; make iter_2.pth older so "newest" matters
    os.utime(work / 'iter_2.pth', (1, 1))
    assert (work / 'last_checkpoint').read_text().endswith('iter_4.pth')
    resume = str(work / 'iter_4.pth') if how == 'named' else 'auto'
    capsys.readouterr()
    runner = _run(work, 'iter', 4, resume=resume, seed=0)
    warnings = [line for line in capsys.readouterr().out.splitlines() if 'cannot be loaded' in line]
    assert len(warnings) == 1 and 'iter_3.pth' in warnings[0] and 'truncated' in warnings[0]
    assert runner.iter == 4
    _assert_bitwise_equal(straight, _params(runner))


def test_resume_without_any_complete_checkpoint_is_one_clear_error(tmp_path):
    _run(tmp_path / 'a', 'iter', 1)
    _truncate(tmp_path / 'a' / 'iter_1.pth')
    with pytest.raises(RuntimeError, match=r"cannot resume: checkpoint .*iter_1.pth' cannot be "
                       r'loaded \(it is truncated'):
        _run(tmp_path / 'a', 'iter', 2, resume='auto')
    with pytest.raises(FileNotFoundError, match='does not exist'):
        _run(tmp_path / 'a', 'iter', 2, resume=str(tmp_path / 'a' / 'iter_9.pth'))


def test_find_resumable_checkpoint_cases(tmp_path):
    good = tmp_path / 'iter_1.pth'
    torch.save({'x': torch.ones(3)}, good)
    empty = tmp_path / 'iter_2.pth'
    empty.write_bytes(b'')
    assert find_resumable_checkpoint(str(good), ()) == (str(good), None)
    path, problem = find_resumable_checkpoint(str(empty), (str(tmp_path), ))
    assert path == str(good) and problem == 'the file is empty'
    assert find_resumable_checkpoint(str(empty), ()) == (None, 'the file is empty')
    assert find_resumable_checkpoint('', (str(tmp_path), ))[0] == str(good)


def _per_rank_worker(rank, world_size, port, out_dir):
    import torch.distributed as dist
    from types import SimpleNamespace

    from dcls_mm.engine.hooks import RNGStateHook
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank,
                            world_size=world_size)
    try:
        random.seed(rank), np.random.seed(10 + rank), torch.manual_seed(20 + rank)
        runner = SimpleNamespace(epoch=0, train_dataloader=None, _resume=True)
        hook = RNGStateHook()
        hook.before_train_epoch(runner)
        hook.after_train_iter(runner, 0)   # all ranks gather here
        mine = get_rng_state()
        checkpoint = [{}]
        if rank == 0:                      # mmengine saves on rank 0 only
            hook.before_save_checkpoint(runner, checkpoint[0])
        dist.broadcast_object_list(checkpoint, src=0)
        assert checkpoint[0]['dcls_mm_resume_state']['world_size'] == world_size
        random.seed(99), np.random.seed(99), torch.manual_seed(99)
        hook.after_load_checkpoint(runner, checkpoint[0])
        set_rng_state(hook._pending['rng'])
        restored = get_rng_state()
        assert restored['python'] == mine['python']
        assert torch.equal(restored['torch'], mine['torch'])
        assert torch.equal(restored['numpy']['key'], mine['numpy']['key'])
        torch.save(torch.rand(3), osp.join(out_dir, f'draw{rank}.pt'))
    finally:
        dist.destroy_process_group()


def test_each_rank_gets_its_own_states_back(tmp_path):
    """Two gloo processes on the CPU: rank 0 saves every rank's states, each rank
    restores its own (the ranks' generators differ)."""
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    # fork: no re-import of torch and mmengine in the children (seconds on 2 cores)
    mp.start_processes(_per_rank_worker, args=(2, port, str(tmp_path)), nprocs=2,
                       start_method='fork')
    draws = [torch.load(tmp_path / f'draw{r}.pt') for r in range(2)]
    assert not torch.equal(draws[0], draws[1])


def test_sigkill_during_a_save_leaves_the_previous_checkpoint(tmp_path):
    """A real SIGKILL in the middle of a save (after the data is written, before the
    rename): the checkpoint under its name is the previous, complete one."""
    import signal
    import subprocess
    import sys
    path = tmp_path / 'iter_1.pth'
    torch.save({'step': torch.tensor(1)}, path)
    code = f'''
import os, signal, io, torch
from dcls_mm.engine.hooks.atomic_checkpoint_hook import AtomicLocalBackend
os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
buf = io.BytesIO()
torch.save({{'step': torch.tensor(2), 'big': torch.zeros(1 << 20)}}, buf)
AtomicLocalBackend().put(buf.getvalue(), {str(path)!r})
'''
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert torch.load(path)['step'] == 1
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != 'iter_1.pth']
    assert len(leftovers) == 1 and leftovers[0].startswith('.iter_1.pth.')
    assert leftovers[0].endswith('.tmp')
    assert find_resumable_checkpoint(str(path), (str(tmp_path), )) == (str(path), None)


def test_load_from_without_resume_starts_afresh(tmp_path):
    """``load_from`` (fine-tuning from a training checkpoint) takes the weights only: no
    generator states restored, no batches skipped."""
    _run(tmp_path / 'a', 'epoch', 1, seed=0)
    from mmengine.runner import Runner
    runner = Runner(
        model=DropoutModel(), work_dir=str(tmp_path / 'c'), experiment_name=f'load{next(_names)}',
        train_dataloader=dict(dataset=RandomAugmentDataset(), batch_size=2, num_workers=0,
                              sampler=dict(type='DefaultSampler', shuffle=True)),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.0)),
        train_cfg=dict(by_epoch=True, max_epochs=1),
        custom_hooks=[dict(type='dcls_mm.RNGStateHook')], randomness=dict(seed=0),
        load_from=str(tmp_path / 'a' / 'iter_2.pth'), log_level='WARNING')
    runner.train()
    assert runner.iter == 4  # all four batches of the epoch, none skipped
    loaded = torch.load(tmp_path / 'a' / 'iter_2.pth', weights_only=False)['state_dict']
    _assert_bitwise_equal(_params(runner), loaded)  # lr 0: the loaded weights, unchanged
