"""torchrun with 2 CPU processes (gloo) gives exactly the single-process numbers."""
import json
import os
import os.path as osp
import subprocess
import sys

import pytest

from dcls_mm.evaluation.classification import EvalConfig, run_evaluation
from tests._helpers import ROOT

from ._robustness_data import MODEL, build_data_root, save_model_checkpoint

# tiny models: one torch thread, module-scoped fixtures included (tests/conftest.py)
pytestmark = pytest.mark.usefixtures('one_thread_module')

TOOL = osp.join(ROOT, 'tools', 'robustness', 'evaluate.py')


def _torchrun(prefix, out, data_root, ckpt):
    cmd = prefix + [TOOL, MODEL, '--checkpoint', ckpt, '--benchmark', 'imagenet', 'imagenet-c',
                    'imagenet-a', '--data-root', data_root, '--out-dir', out,
                    '--batch-size', '2', '--workers', '0', '--no-progress']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(osp.join(out, 'results.json')) as f:
        return json.load(f), proc


@pytest.mark.slow  # torchrun, 2 processes
def test_two_processes_equal_one(tmp_path):
    ckpt = save_model_checkpoint(str(tmp_path / 'model.pth'))
    data_root = build_data_root(str(tmp_path / 'data'), ckpt)
    # the single-process run in this process (one interpreter start less)
    run_evaluation(EvalConfig(model=MODEL, benchmarks=['imagenet', 'imagenet-c', 'imagenet-a'],
                              out_dir=str(tmp_path / 'one'), data_root=data_root,
                              checkpoint=ckpt, batch_size=2, workers=0, progress=False))
    with open(osp.join(tmp_path, 'one', 'results.json')) as f:
        one = json.load(f)
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone',
                '--nproc_per_node', '2']
    two, proc = _torchrun(torchrun, str(tmp_path / 'two'), data_root, ckpt)
    assert two['world_size'] == 2 and one['world_size'] == 1
    # odd set sizes (3 images per ImageNet-C set): unequal shards, still exact
    assert two['benchmarks'] == one['benchmarks']
    assert two['benchmarks']['imagenet-c']['num_images'] == 9
    with open(osp.join(tmp_path, 'two', 'records.jsonl')) as f:
        keys = [json.loads(line).get('key') for line in f.read().splitlines()[1:]]
    assert len(keys) == len(set(keys)) == 1 + 3 + 1  # rank 0 alone wrote, once per set
    assert proc.stdout.count('clean top-1') == 1  # one summary table (rank 0)
