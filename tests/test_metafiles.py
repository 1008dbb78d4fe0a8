"""The OpenMMLab metadata: ``model-index.yml`` and ``configs/*/metafile.yml``.

mim (``mim search``, ``mim download``) reads them; they must list exactly the configs that
exist, and their results must be the numbers that ``docs/recipes.md`` gives as the paper's.
"""
from __future__ import annotations

import re

import pytest
import yaml

from tests._helpers import ROOT

# configs/_base_/ holds fragments that configs inherit, not models (as in mmdet)
CONFIGS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / 'configs').glob('*/*.py')
                 if p.parent.name != '_base_')


def _read(relpath: str) -> dict:
    with open(ROOT / relpath) as f:
        return yaml.safe_load(f)


def _metafiles() -> list[str]:
    return _read('model-index.yml')['Import']


def _models() -> list[dict]:
    return [model for metafile in _metafiles() for model in _read(metafile)['Models']]


def _paper_table(section: str) -> dict[str, list[float]]:
    """``{backbone: [numbers...]}`` from one results table of docs/recipes.md."""
    text = (ROOT / 'docs/recipes.md').read_text()
    body = text.split(f'## {section}', 1)[1].split('\n## ', 1)[0]
    rows = re.findall(r'^\| (ConvNeXt-[TSB](?:-dcls)?) +\|(.*)\|$', body, flags=re.M)
    return {name: [float(cell) for cell in cells.split('|')] for name, cells in rows}


def test_model_index_lists_every_metafile():
    on_disk = sorted(str(p.relative_to(ROOT)) for p in (ROOT / 'configs').glob('*/metafile.yml'))
    assert sorted(_metafiles()) == on_disk
    # one metafile per config folder
    assert sorted({c.rsplit('/', 1)[0] for c in CONFIGS}) == [m.rsplit('/', 1)[0] for m in on_disk]


def test_every_config_has_one_entry_and_every_entry_a_config():
    entries = [model['Config'] for model in _models()]
    assert len(entries) == len(set(entries)), 'a config is listed twice'
    assert sorted(entries) == CONFIGS


def test_entries_are_consistent():
    for metafile in _metafiles():
        meta = _read(metafile)
        collections = {c['Name'] for c in meta['Collections']}
        for model in meta['Models']:
            # the OpenMMLab convention: the model's name is its config's file name
            assert model['Config'].endswith(f"/{model['Name']}.py")
            assert model['In Collection'] in collections
            assert (ROOT / model['README']).is_file()
            assert 'Weights' not in model, 'dcls-mm publishes no weights'
            if 'Results' in model:
                assert model['Metadata']['Results Source'].startswith('DCLS paper')


@pytest.mark.parametrize('section, prefix, metrics', [
    ('COCO', 'cascade-mask-rcnn_', ('box AP', 'mask AP')),
    ('ADE20K', 'upernet_', ('mIoU', 'mIoU(ms+flip)')),
])
def test_results_are_the_papers_numbers(section, prefix, metrics):
    table = _paper_table(section)
    assert len(table) == 6
    checked = 0
    for model in _models():
        match = re.match(prefix + r'convnext(-dcls)?-([tsb])_', model['Name'])
        if not match or 'demo' in model['Name']:
            continue
        backbone = f'ConvNeXt-{match[2].upper()}' + ('-dcls' if match[1] else '')
        got = {k: v for result in model['Results'] for k, v in result['Metrics'].items()}
        # the two metrics are the table's last two columns
        assert [got[m] for m in metrics] == table[backbone][-2:], model['Name']
        checked += 1
    assert checked == 6


def test_mim_reads_the_model_index():
    """mim's own reader (the ``model-index`` package) parses the index into its table."""
    modelindex = pytest.importorskip('modelindex')
    search = pytest.importorskip('mim.commands.search')
    index = modelindex.load(str(ROOT / 'model-index.yml'))
    # modelindex resolves README paths against the metafile's folder, while OpenMMLab
    # (and mim) write them from the repository root: that one check is not ours
    errors = [e for e in index.check(silent=True) if 'Path to README file' not in e]
    assert errors == []
    table = search.convert2df(index)
    assert sorted(table.index) == sorted(model['Name'] for model in _models())
    row = table.loc['cascade-mask-rcnn_convnext-dcls-t_fpn_4conv1fc-giou_amp-ms-crop-3x_coco']
    assert (row['coco/box_ap'], row['coco/mask_ap']) == (51.2, 44.5)
