"""tools/train.py, tools/test.py, the launchers, demo.py's fast steps, and resuming a
full mmengine training checkpoint under torch's weights_only default; what the tools
print: the quiet console, the pre-flight errors on missing data/checkpoints, --resume
after the end, and no profiler chatter from the benchmarks' memory measurement."""
import os
import os.path as osp
import pickle
import subprocess
import sys

import pytest
import torch

from tests._helpers import ROOT, load_tool
from tests.integration.conftest import DEMO_DET, DEMO_SEG

TOOLS = osp.join(ROOT, 'tools')


@pytest.fixture(scope='module')
def tools():
    return load_tool('tools/train.py'), load_tool('tools/test.py')


def _options(data_root, max_iters):
    return ['--cfg-options'] + [f'{s}_dataloader.dataset.data_root={data_root}'
                                for s in ('train', 'val', 'test')] + [
        f'train_cfg.max_iters={max_iters}', f'train_cfg.val_interval={max_iters}',
        'default_hooks.checkpoint.interval=1', 'param_scheduler.0.end=1',
        'param_scheduler.1.begin=1', 'param_scheduler.1.end=4', 'log_level=WARNING']


class Evil:  # pickled by reference: an untrusted global in a "checkpoint"
    pass


def test_train_resume_test_cli(tools, tmp_path, capsys):
    from dcls_mm.datasets import make_ade20k_demo
    train_tool, test_tool = tools
    data = make_ade20k_demo(str(tmp_path / 'ade'), num_images=2, num_val_images=1,
                            image_size=(64, 64))
    work = str(tmp_path / 'work')
    runner = train_tool.main([DEMO_SEG, '--work-dir', work] + _options(data['data_root'], 1))
    ckpt = osp.join(work, 'iter_1.pth')
    assert osp.isfile(ckpt) and runner.iter == 1
    # torch >= 2.6 refuses mmengine's own training checkpoint by default ...
    with pytest.raises(pickle.UnpicklingError):
        torch.load(ckpt)
    # ... the tools read it through the checked loader: resume continues at iter 1
    runner = train_tool.main([DEMO_SEG, '--work-dir', work, '--resume'] +
                             _options(data['data_root'], 2))
    assert runner.iter == 2 and osp.isfile(osp.join(work, 'iter_2.pth'))
    preds = str(tmp_path / 'preds')
    capsys.readouterr()
    metrics = test_tool.main([DEMO_SEG, osp.join(work, 'iter_2.pth'), '--work-dir', work,
                              '--out', preds, '--verbose'] + _options(data['data_root'], 2))
    assert 'mIoU' in metrics
    # --verbose: mmengine's log on the console too (here at the options' WARNING level:
    # the IoUMetric notice the quiet console leaves to the log file)
    assert 'The prefix is not set in metric class IoUMetric' in capsys.readouterr().out
    # mmseg's --out: one prediction PNG per validation image in the OUT directory
    val_images = os.listdir(osp.join(data['data_root'], data['val_img']))
    assert sorted(os.listdir(preds)) == sorted(
        osp.splitext(name)[0] + '.png' for name in val_images)

    from mmengine.runner.checkpoint import CheckpointLoader
    evil = str(tmp_path / 'evil.pth')
    torch.save({'state_dict': {}, 'x': Evil()}, evil)
    with pytest.raises(pickle.UnpicklingError, match='refusing'):
        CheckpointLoader.load_checkpoint(evil)


def test_prediction_output_follows_the_downstream_test_tool(tmp_path):
    from mmdet.evaluation import DumpDetResults
    from mmengine.config import Config
    from mmengine.evaluator import DumpResults

    from dcls_mm.engine.runner_utils import set_prediction_output
    # mmdet's tools/test.py: DumpDetResults appended to the test evaluator, .pkl only
    det = Config(dict(default_scope='mmdet', test_evaluator=dict(type='CocoMetric')))
    dump = set_prediction_output(det, str(tmp_path / 'det.pkl'))
    assert type(dump) is DumpDetResults and dump.out_file_path == str(tmp_path / 'det.pkl')
    assert dict(det.test_evaluator) == dict(type='CocoMetric')
    with pytest.raises(ValueError, match='pkl'):
        set_prediction_output(det, str(tmp_path / 'det.json'))
    # mmseg's tools/test.py: output_dir + keep_results on the test evaluator, no metric
    seg = Config(dict(default_scope='mmseg', test_evaluator=dict(type='IoUMetric')))
    assert set_prediction_output(seg, str(tmp_path / 'seg')) is None
    assert dict(seg.test_evaluator) == dict(type='IoUMetric', output_dir=str(tmp_path / 'seg'),
                                            keep_results=True)
    other = Config(dict(default_scope='mmpretrain', test_evaluator=dict(type='Accuracy')))
    assert type(set_prediction_output(other, str(tmp_path / 'o.pkl'))) is DumpResults


def test_amp_falls_back_to_fp32_without_gpu():
    from mmengine.config import Config

    from dcls_mm.engine.runner_utils import fall_back_to_fp32_on_cpu
    cfg = Config(dict(optim_wrapper=dict(type='AmpOptimWrapper', loss_scale='dynamic',
                                         optimizer=dict(type='AdamW', lr=1e-4))))
    fall_back_to_fp32_on_cpu(cfg)
    expected = 'AmpOptimWrapper' if torch.cuda.is_available() else 'OptimWrapper'
    assert cfg.optim_wrapper.type == expected
    if not torch.cuda.is_available():
        assert 'loss_scale' not in cfg.optim_wrapper


def test_configs_resolve_dcls_mm_scope_without_importing_it():
    """What `mim train mmdet CONFIG` relies on: mmdet's own train.py never imports dcls_mm;
    the config's custom_imports and the 'dcls_mm.' registry scope are enough. Run in a
    fresh interpreter, custom imports off, so only the registry scope can resolve it."""
    code = (
        'import sys\n'
        'from mmengine.config import Config\n'
        'from mmengine.registry import init_default_scope\n'
        f'cfg = Config.fromfile({DEMO_DET!r}, import_custom_modules=False)\n'
        "assert 'dcls_mm' not in sys.modules\n"
        "init_default_scope('mmdet')\n"
        'from mmdet.registry import MODELS\n'
        'model = MODELS.build(cfg.model)\n'
        "print(type(model.backbone).__module__)\n")
    out = subprocess.run([sys.executable, '-W', 'ignore', '-c', code], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith('dcls_mm.models.backbones.convnext_dcls')


SHIM = """#!/usr/bin/env bash
{ printf 'PYTHONPATH=%s\\n' "${PYTHONPATH:-}"; printf '%s\\n' "$(basename "$0")" "$@"; } > "$SHIM_LOG"
"""


def _run_launcher(tmp_path, script, args, **env):
    """Run tools/<script> with fake ``python`` and ``srun`` first on PATH (and no venv, so
    the scripts fall back to ``python``); return the command line the fake received."""
    shims = tmp_path / 'bin'
    shims.mkdir(exist_ok=True)
    for name in ('python', 'srun'):
        (shims / name).write_text(SHIM)
        (shims / name).chmod(0o755)
    log = tmp_path / 'argv.txt'
    log.unlink(missing_ok=True)
    run_env = {k: v for k, v in os.environ.items() if k not in (
        'PYTHON', 'PYTHONPATH', 'NNODES', 'NODE_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'GPUS',
        'GPUS_PER_NODE', 'CPUS_PER_TASK', 'SRUN_ARGS')}
    run_env.update(PATH=f'{shims}{os.pathsep}{os.environ["PATH"]}', SHIM_LOG=str(log),
                   DCLS_MM_VENV=str(tmp_path / 'no-venv'), **env)
    path = osp.join(TOOLS, script)
    out = subprocess.run(['bash', path] + args, capture_output=True, text=True, env=run_env,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    pythonpath, *argv = log.read_text().splitlines()
    assert pythonpath.split('=', 1)[1].split(os.pathsep)[0] == str(ROOT)
    return argv


@pytest.mark.parametrize('script,nargs', [('dist_train.sh', 2), ('slurm_train.sh', 4)])
def test_launcher_scripts_usage(script, nargs):
    path = osp.join(TOOLS, script)
    assert os.access(path, os.X_OK)
    assert subprocess.run(['bash', '-n', path]).returncode == 0
    out = subprocess.run(['bash', path] + ['x'] * (nargs - 1), capture_output=True, text=True)
    assert out.returncode == 2 and 'usage' in out.stderr


def test_dist_train_command_line(tmp_path):
    train = osp.join(TOOLS, 'train.py')
    assert _run_launcher(tmp_path, 'dist_train.sh', ['CFG.py', '4', '--amp']) == [
        'python', '-m', 'torch.distributed.run', '--nnodes=1', '--node_rank=0',
        '--master_addr=127.0.0.1', '--nproc_per_node=4', '--master_port=29500',
        train, 'CFG.py', '--launcher', 'pytorch', '--amp']
    argv = _run_launcher(tmp_path, 'dist_train.sh', ['CFG.py', '8'], NNODES='2',
                         NODE_RANK='1', MASTER_ADDR='10.0.0.1', MASTER_PORT='1234')
    assert argv[3:8] == ['--nnodes=2', '--node_rank=1', '--master_addr=10.0.0.1',
                         '--nproc_per_node=8', '--master_port=1234']


def test_slurm_train_command_line(tmp_path):
    train = osp.join(TOOLS, 'train.py')
    argv = _run_launcher(tmp_path, 'slurm_train.sh', ['gpu', 'job', 'CFG.py', 'WD', '--amp'],
                         GPUS='16', SRUN_ARGS='--time=1:00:00 --qos=high')
    assert argv == [
        'srun', '-p', 'gpu', '--job-name=job', '--gres=gpu:8', '--ntasks=16',
        '--ntasks-per-node=8', '--cpus-per-task=5', '--kill-on-bad-exit=1',
        '--time=1:00:00', '--qos=high',
        'python', '-u', train, 'CFG.py', '--work-dir=WD', '--launcher=slurm', '--amp']


def test_demo_layer_and_backbone_steps():
    demo = load_tool('tools/demo.py')
    layer = demo.demo_layer()
    assert layer['kernel'] == [8, 1, 9, 9] and layer['position_grad_norm'] > 0
    backbone = demo.demo_backbone()
    assert backbone['positions_with_grad'] == backbone['position_tensors'] == 4
    assert backbone['params'] <= backbone['dense_params']


def test_cpu_peak_memory_prints_no_profiler_chatter(capfd):
    """The profiler's own USDT / gpuGetDeviceCount lines stay off the console; what the
    measured function writes to stderr still gets there."""
    import sys

    from dcls_mm.utils.benchmark import PROFILER_CHATTER, peak_memory_mib

    def fn():
        print('from the measured function', file=sys.stderr)
        return torch.ones(256, 1024) * 2  # 1 MiB result + the ones temporary

    assert PROFILER_CHATTER.match('USDT:2026-11-30 14:59:43 22950:22950 '
                                  'SyncActivityProfilerHandler.cpp:52] profiler_start')
    assert peak_memory_mib(fn) == pytest.approx(2.0, abs=0.1)
    out, err = capfd.readouterr()
    assert 'USDT' not in out + err and 'gpuGetDeviceCount' not in out + err
    assert err.splitlines() == ['from the measured function']


RECIPE_DET = osp.join(
    ROOT, 'configs/cascade_mask_rcnn/cascade-mask-rcnn_convnext-dcls-t_fpn_4conv1fc-giou_'
    'amp-ms-crop-3x_coco.py')


def _cli_error(main, argv, capsys):
    """``run_cli(main, argv)`` must exit with code 2; returns its stderr lines."""
    from dcls_mm.engine.runner_utils import run_cli
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run_cli(main, argv)
    assert info.value.code == 2
    return capsys.readouterr().err.splitlines()


def test_missing_data_and_checkpoints_reported_at_once_before_building(tools, tmp_path,
                                                                       capsys):
    """A recipe config with a data root and a pretrained checkpoint that do not exist:
    both named in one line each, with where the README explains the layout, exit code 2
    and no traceback, before the model or the datasets are built."""
    train_tool, test_tool = tools
    missing_root, missing_ckpt = tmp_path / 'no-coco', tmp_path / 'no.pth'
    options = ['--cfg-options', f'model.backbone.init_cfg.checkpoint={missing_ckpt}'] + [
        f'{s}_dataloader.dataset.data_root={missing_root}/' for s in ('train', 'val', 'test')]
    err = _cli_error(train_tool.main, [RECIPE_DET, '--work-dir', str(tmp_path / 'w')] + options,
                     capsys)
    errors = [line for line in err if ': error: ' in line]
    layout = 'layout: README.md, "Training and testing" > "Data and checkpoints"'
    assert errors == [
        f'{osp.basename(sys.argv[0])}: error: data root {missing_root}/ does not exist '
        f'(train_dataloader, val_dataloader); {layout}',
        f'{osp.basename(sys.argv[0])}: error: checkpoint {missing_ckpt} does not exist '
        f'(model.backbone.init_cfg.checkpoint); {layout}']
    assert 'Traceback' not in '\n'.join(err) and not (tmp_path / 'w').exists()
    # tools/test.py: its checkpoint argument and the test data; the model's Pretrained
    # file is never read there
    err = _cli_error(test_tool.main, [RECIPE_DET, str(tmp_path / 'epoch_9.pth'), '--work-dir',
                                      str(tmp_path / 'w')] + options, capsys)
    assert [line.split(': error: ')[1].split(';')[0] for line in err] == [
        f'data root {missing_root}/ does not exist (test_dataloader)',
        f'checkpoint {tmp_path / "epoch_9.pth"} does not exist (load_from)']


def test_missing_annotation_file_and_relative_paths(tmp_path, monkeypatch):
    from dcls_mm.datasets.checks import missing_checkpoints, missing_data
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'coco' / 'train2017').mkdir(parents=True)
    dataset = dict(type='CocoDataset', data_root='coco/', ann_file='annotations/train.json',
                   data_prefix=dict(img='train2017/'))
    cfg = dict(train_dataloader=dict(dataset=dict(type='RepeatDataset', times=2,
                                                  dataset=dataset)),
               load_from='https://example.com/x.pth',
               model=dict(backbone=dict(init_cfg=[dict(type='Normal'), dict(
                   type='Pretrained', checkpoint='ckpt/b.pth')])))
    assert missing_data(cfg) == [
        f'annotation file coco/annotations/train.json (= {tmp_path}/coco/annotations/train.json)'
        ' does not exist (train_dataloader)']
    assert missing_checkpoints(cfg) == [
        f'checkpoint ckpt/b.pth (= {tmp_path}/ckpt/b.pth) does not exist '
        '(model.backbone.init_cfg[1].checkpoint)']
    assert missing_checkpoints(cfg, pretrained=False) == []  # URLs: left to their loader


def test_known_third_party_warnings_only_are_ignored():
    import warnings

    from dcls_mm.utils.console import ignore_known_warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        ignore_known_warnings()
        warnings.warn('pkg_resources is deprecated as an API. See ...', UserWarning)
        warnings.warn('pkg_resources is deprecated as an API', DeprecationWarning)
        warnings.warn('something else', UserWarning)
    assert [(w.category, str(w.message)) for w in caught] == [
        (DeprecationWarning, 'pkg_resources is deprecated as an API'),
        (UserWarning, 'something else')]


def test_demo_detector_quiet_console_and_resume_after_the_end(tools, tmp_path, capsys):
    """tools/train.py on the demo detector (one iteration): the console has the progress,
    the metrics and where the log is; the log file has mmengine's full log and
    pycocotools' prints. ``--resume`` once training has finished says so."""
    from dcls_mm.datasets import make_coco_demo
    from dcls_mm.datasets.demo import coco_demo_cfg_options
    train_tool, _ = tools
    data = make_coco_demo(str(tmp_path / 'coco'), num_images=2, num_val_images=1,
                          image_size=(96, 64))
    options = ['--cfg-options'] + [f'{k}={v}' for k, v in coco_demo_cfg_options(data).items()]
    work = str(tmp_path / 'work')
    capsys.readouterr()
    runner = train_tool.main([DEMO_DET, '--work-dir', work] + options)
    console = capsys.readouterr().out.splitlines()
    assert runner.iter == 1 and osp.isfile(osp.join(work, 'epoch_1.pth'))
    assert console[0].startswith('  train iter 1/1  loss ')
    assert console[1].startswith('  val: coco/bbox_mAP ')
    assert console[2] == f'  log: {runner.logger.log_file}; checkpoints: {work}'
    assert len(console) == 3
    with open(runner.logger.log_file) as f:
        log = f.read()
    assert 'Config:' in log and 'Epoch(train) [1][1/1]' in log
    assert 'loading annotations into memory...' in log and 'Average Precision' in log

    runner = train_tool.main([DEMO_DET, '--work-dir', work, '--resume'] + options)
    console = capsys.readouterr().out
    assert runner.iter == 1
    assert ('training already finished at iter 1 of 1 (epoch 1 of 1) in '
            f'{work}; nothing to do (raise train_cfg.max_epochs to train further)') in console
    assert 'train iter' not in console

    # tools/test.py --out: pycocotools' prints go to the log here too (the dump metric
    # built the evaluator before the console was quieted)
    _, test_tool = tools
    ckpt = osp.join(work, 'epoch_1.pth')
    test_tool.main([DEMO_DET, ckpt, '--work-dir', work, '--out', str(tmp_path / 'p.pkl')]
                   + options)
    console = capsys.readouterr()
    assert 'loading annotations' not in console.out + console.err
    assert osp.isfile(tmp_path / 'p.pkl')
    # one line each, no traceback: a truncated checkpoint, a wrong --out suffix, a
    # config that does not exist
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(open(ckpt, 'rb').read()[:1000])
    for argv, message in (
            ([DEMO_DET, str(truncated)], 'not a readable PyTorch checkpoint'),
            ([DEMO_DET, ckpt, '--out', str(tmp_path / 'p.json')], '--out must be a .pkl'),
            ([DEMO_DET[:-3] + '_nope.py', ckpt], '_nope.py does not exist')):
        err = _cli_error(test_tool.main, argv + ['--work-dir', work] + options, capsys)
        assert any(message in line and ': error: ' in line for line in err), err
        assert 'Traceback' not in '\n'.join(err)


def test_demo_prints_one_line_per_step_and_a_table(tmp_path, capsys):
    """The demo's console: a progress line and a result line per step, then the table;
    what the steps print goes to demo.log; summary.json has every step."""
    import json
    demo = load_tool('tools/demo.py')
    summary = demo.main(['--work-dir', str(tmp_path), '--skip-det', '--skip-seg',
                         '--skip-robustness'])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith('[1/2] a DCLS layer (Dcls2d, depthwise, bilinear) ... ')
    assert lines[1] == '      ' + summary['layer']['line']
    assert lines[2].startswith('[2/2] ConvNeXt-dcls-atto backbone: forward / backward ... ')
    assert lines[3] == '      ' + summary['backbone']['line']
    assert lines[5].startswith(f'Results ({summary["total_s"]} s; ')
    assert lines[6].split() == ['step', 'metric', 'value', 'where']
    assert lines[7].split() == ['layer', '|dL/dP|', f'{summary["layer"]["position_grad_norm"]:.3g}']
    assert lines[8].split() == ['backbone', 'params', '(M)',
                                f'{summary["backbone"]["params"] / 1e6:.2f}']
    with open(tmp_path / 'summary.json') as f:
        assert set(json.load(f)) == {'torch', 'layer', 'backbone', 'total_s'}
    assert '=== a DCLS layer' in (tmp_path / 'demo.log').read_text()


def test_demo_downstream_step_prints_nothing_and_logs_everything(tmp_path, capsys):
    """The demo's segmentation entry: generated ADE20K-format data, the demo config
    trained for its 4 iterations; nothing reaches the console, the run's log file has
    mmengine's log, the result has the losses and the metrics the table shows."""
    demo = load_tool('tools/demo.py')
    task = demo._downstream_tasks()['seg']
    capsys.readouterr()
    result = demo.demo_downstream(task, str(tmp_path), num_images=2)
    assert capsys.readouterr().out == ''
    assert len(result['losses']) == 4 and {'mIoU', 'aAcc'} <= set(result['metrics'])
    assert osp.isdir(osp.join(tmp_path, 'data', 'ade', 'images', 'training'))
    assert osp.isfile(osp.join(result['work_dir'], 'iter_4.pth'))
    with open(result['log']) as f:
        assert 'Iter(train) [4/4]' in f.read()
    assert result['line'].startswith('4 iterations, loss ') and 'mIoU' in result['line']
