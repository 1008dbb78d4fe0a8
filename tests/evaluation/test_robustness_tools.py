"""The robustness scripts end to end at tiny settings: the speed benchmark's output (not
its speed), the demo's ImageNet-C step, and compare.py's command line."""
import json

import pytest
import torch

from tests._helpers import load_tool

# tiny models: one torch thread, module-scoped fixtures included (tests/conftest.py)
pytestmark = pytest.mark.usefixtures('one_thread_module')


def test_benchmark_prints_ratio_and_cpu_capability(tmp_path, capsys):
    bench = load_tool('tools/analysis/benchmark_robustness.py')
    out = tmp_path / 'bench.json'
    result = bench.main(['--model', 'test_resnet', '--images', '10', '--sets', '1',
                         '--batch-size', '4', '--rounds', '1', '--workers', '0',
                         '--out', str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result['images'] == 10 and result['cpu_capability'] == \
        torch.backends.cpu.get_cpu_capability()
    assert result['ratio'] == pytest.approx(result['tool_images_per_s'] /
                                            result['bare_images_per_s'])
    printed = capsys.readouterr().out
    assert f'ratio {result["ratio"]:.3f}' in printed
    assert f'CPU capability {result["cpu_capability"]}' in printed


def test_demo_imagenet_c_step(tmp_path, capsys):
    demo = load_tool('tools/demo.py')
    out = demo.demo_robustness(str(tmp_path), num_classes=1, size=32)
    assert set(out['models']) == {'convnext_atto', 'convnext_dcls_tiny-atto'}
    for model in out['models'].values():
        with open(model['results']) as f:
            c = json.load(f)['benchmarks']['imagenet-c']
        assert c['incomplete'] == [] and len(c['errors']) == 15
        assert model['mCE'] == pytest.approx(sum(c['CE'].values()) / 15)
    printed = capsys.readouterr().out
    assert 'C mCE' in printed and 'delta convnext_dcls_tiny arch=atto' in printed


def test_compare_cli(tmp_path, capsys):
    cli = load_tool('tools/robustness/compare.py')
    a = tmp_path / 'a.json'
    a.write_text(json.dumps({'model': 'm', 'benchmarks': {'imagenet': {'top1': 70.0}}}))
    cli.main([str(a)])
    assert 'clean top-1' in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        cli.main([str(tmp_path / 'missing.json')])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('compare.py: error: ') and 'does not exist' in err and '\n' not in err
