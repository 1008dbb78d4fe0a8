"""The analysis benchmarks run end to end and write what they print (tiny settings: these
tests check the scripts' logic and output format, never speed)."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / 'tools' / 'analysis' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def bench():
    return _load('benchmark_convnext_dcls')


def test_layer_part_writes_json(bench, tmp_path, capsys):
    out = tmp_path / 'bench.json'
    results = bench.main(['--only', 'layer', '--skip-plain', '--repeats', '1', '--batch', '1',
                          '--out', str(out)])
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(results))
    assert written['compiled_kernels'] is True  # the set-up built them
    rows = written['layer']
    assert [(r['C'], r['H'], r['layout']) for r in rows] == [
        (c, h, layout) for c, h in bench.STAGES for layout in ('nchw', 'channels_last')]
    for row in rows:
        assert row['dense7_ms'] > 0 and row['dcls_ms'] > 0 and 'plain_ms' not in row
    printed = capsys.readouterr().out
    assert 'compiled C++ kernels' in printed
    assert printed.count('x ') >= len(rows)  # one ratio per row


def test_throughput_runs_on_any_device(bench):
    result = bench.throughput('cpu', batch=1, repeats=1, plain=True)
    assert result['batch'] == 1
    assert set(result['images_per_s']) == {'convnext_tiny', 'convnext_dcls_tiny',
                                           'convnext_dcls_tiny_plain'}
    ips = result['images_per_s']
    assert result['ratio'] == pytest.approx(ips['convnext_dcls_tiny'] / ips['convnext_tiny'])
    assert all(v > 0 for v in ips.values())
