"""dcls_mm.datasets.checks.missing_checkpoints / missing_data: what a run needs on disk,
reported before anything is built."""
import torch

from dcls_mm.datasets.checks import missing_checkpoints, missing_data


def _cfg(load_from=None, pretrained=None, data_root=None):
    backbone = dict(type='X')
    if pretrained is not None:
        backbone['init_cfg'] = dict(type='Pretrained', checkpoint=pretrained)
    return dict(load_from=load_from, model=dict(backbone=backbone),
                test_dataloader=dict(dataset=dict(data_root=data_root, ann_file='a.json',
                                                  data_prefix=dict(img='val/'))))


def test_checkpoint_paths_with_home_are_expanded_like_mmengine(tmp_path, monkeypatch):
    monkeypatch.setenv('HOME', str(tmp_path))
    torch.save({}, tmp_path / 'w.pth')
    assert missing_checkpoints(_cfg(load_from='~/w.pth', pretrained='~/w.pth')) == []
    lines = missing_checkpoints(_cfg(load_from='~/gone.pth', pretrained='~/w.pth'))
    assert len(lines) == 1 and 'gone.pth' in lines[0] and '(load_from)' in lines[0]


def test_pretrained_checked_only_when_asked(tmp_path):
    cfg = _cfg(pretrained=str(tmp_path / 'p.pth'))
    assert missing_checkpoints(cfg, pretrained=False) == []
    (line, ) = missing_checkpoints(cfg)
    assert 'p.pth' in line and 'model.backbone.init_cfg.checkpoint' in line
    # URLs and scheme:// names are left to their loaders
    assert missing_checkpoints(_cfg(pretrained='https://x/y.pth', load_from='s3://b/c.pth')) == []


def test_missing_root_hides_what_is_under_it(tmp_path):
    (line, ) = missing_data(_cfg(data_root=str(tmp_path / 'nowhere')))
    assert 'data root' in line and 'nowhere' in line and 'test_dataloader' in line
    (tmp_path / 'val').mkdir()
    (line, ) = missing_data(_cfg(data_root=str(tmp_path)))
    assert line.startswith('annotation file') and 'a.json' in line
