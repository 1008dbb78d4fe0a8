"""The CLIs in tools/analysis over dcls_mm.analysis: specs, checkpoints, outputs, errors."""
import json
import os.path as osp

import pytest
import torch

from dcls_mm.models import ConvNeXtDCLS
from tests._helpers import ROOT, load_tool

ARCH = "arch={'depths': [1, 1, 1, 1], 'dims': [8, 8, 8, 8]}"
SPEC = f'convnext_dcls:{ARCH},dilated_kernel_size=7,kernel_count=3'


@pytest.fixture
def checkpoint(tmp_path):
    """A dcls-mm backbone checkpoint with hand-set positions (all at +3, the limit)."""
    torch.manual_seed(0)
    model = ConvNeXtDCLS(dict(depths=[1, 1, 1, 1], dims=[8, 8, 8, 8]), dilated_kernel_size=7,
                         kernel_count=3)
    with torch.no_grad():
        for m in model.dcls_convs():
            m.P.fill_(3.0)
    path = str(tmp_path / 'backbone.pth')
    torch.save({'state_dict': {f'backbone.{k}': v for k, v in model.state_dict().items()},
                'meta': {'epoch': 1}}, path)
    return path


def test_erf_cli(tmp_path, capsys):
    out = tmp_path / 'erf'
    result = load_tool('tools/analysis/erf.py').main([
        '--model', SPEC, '--model', 'timm:test_convnext', '--label', 'dcls', '--label', 'timm',
        '--num-images', '1', '--size', '32', '--stage', '1', '--out-dir', str(out)])
    assert set(result['models']) == {'dcls', 'timm'}
    assert (out / 'erf_dcls.npy').exists() and (out / 'erf_timm.npy').exists()
    assert json.loads((out / 'erf.json').read_text())['generated_images'] is True


def test_positions_cli_reads_the_checkpoint(tmp_path, checkpoint, capsys):
    result = load_tool('tools/analysis/positions.py').main(['--model', f'{SPEC}@{checkpoint}',
                                                            '--out-dir', str(tmp_path / 'pos')])
    for stats in result['groups'].values():
        assert stats['num_elements'] == 24 and stats['at_limit'] == 24
        assert stats['cell_counts'][6][6] == 24
    assert 'at limit 24 (100.0%)' in capsys.readouterr().out


def test_position_dynamics_cli(tmp_path, checkpoint, capsys):
    state = torch.load(checkpoint, weights_only=True)
    moved = {k: (v - 1 if k.endswith('.P') else v) for k, v in state['state_dict'].items()}
    second = str(tmp_path / 'second.pth')
    torch.save({'state_dict': moved, 'meta': {'epoch': 5}}, second)
    result = load_tool('tools/analysis/position_dynamics.py').main(
        ['--checkpoints', checkpoint, second, '--out-dir', str(tmp_path / 'dyn')])
    # every element moved by (-1, -1) over 4 epochs
    assert [r['speed'] for r in result['rows']] == pytest.approx([2 ** 0.5 / 4] * 4)
    assert (tmp_path / 'dyn' / 'position_speeds.csv').exists()
    with pytest.raises(SystemExit, match='at least two'):
        load_tool('tools/analysis/position_dynamics.py').main(['--checkpoints', checkpoint])


def test_complexity_cli(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / 'table.md')
    table = load_tool('tools/analysis/complexity.py').main([
        '--model', SPEC, '--model', f'convnext_dcls:{ARCH},dwconv_type=dense', '--label', 'dcls',
        '--label', 'dense', '--shape', '32', '32', '--batch-size', '1', '--repeats', '1',
        '--out', out])
    assert table.startswith('| model | input |') and '| `dcls` | 32x32 |' in table
    assert 'CPU capability' in table
    rows = json.loads(open(out[:-3] + '.json').read())
    assert rows[1]['flops'] > 0 and rows[0]['throughput'] > 0
    # a new folder, and a name without suffix under './' (the JSON went to a hidden
    # '.json' in the working directory)
    monkeypatch.chdir(tmp_path)
    load_tool('tools/analysis/complexity.py').main([
        '--model', SPEC, '--shape', '32', '32', '--no-throughput', '--out', './new/table'])
    assert (tmp_path / 'new' / 'table').is_file() and (tmp_path / 'new' / 'table.json').is_file()


def test_bad_specs_are_one_line_errors(tmp_path):
    with pytest.raises(SystemExit, match="SOURCE must be one of"):
        load_tool('tools/analysis/complexity.py').main(['--model', 'resnet50', '--no-throughput'])
    with pytest.raises(SystemExit, match='is not a file'):
        load_tool('tools/analysis/positions.py').main(['--model', f'{SPEC}@{tmp_path}/missing.pth'])
    with pytest.raises(SystemExit, match='no DCLS layer'):
        load_tool('tools/analysis/positions.py').main(
            ['--model', f'convnext_dcls:{ARCH},dwconv_type=dense', '--out-dir', str(tmp_path)])


def test_config_backbone_with_a_downstream_checkpoint(tmp_path, capsys):
    """The demo detector config's backbone (atto, dilated kernel 9) with the weights of
    a whole-detector checkpoint (backbone under ``backbone.``, other keys ignored)."""
    from dcls_mm.analysis.loading import build_analysis_model
    config = osp.join(ROOT, 'configs', 'demo',
                      'cascade-mask-rcnn_convnext-dcls-atto_fpn_4conv1fc-giou_ms-crop-1e_demo-coco.py')
    source = build_analysis_model(config)
    with torch.no_grad():
        for m in source.dcls_convs():
            m.P.uniform_(-4, 4)
    state = {f'backbone.{k}': v for k, v in source.state_dict().items()}
    state['neck.lateral_convs.0.conv.weight'] = torch.zeros(32, 40, 1, 1)
    path = str(tmp_path / 'epoch_1.pth')
    torch.save({'state_dict': state, 'meta': {'epoch': 1}}, path)
    loaded = build_analysis_model(f'{config}@{path}')
    assert loaded.dilated_kernel_size == 9 and not loaded.training
    for a, b in zip(source.dcls_convs(), loaded.dcls_convs()):
        assert torch.equal(a.P, b.P)
    result = load_tool('tools/analysis/positions.py').main(['--model', f'{config}@{path}',
                                                            '--out-dir', str(tmp_path / 'pos')])
    assert result['groups']['stage0']['dilated_kernel_size'] == [9, 9]
