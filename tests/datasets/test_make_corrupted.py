"""Pre-generated corrupted sets (dcls_mm.evaluation.corrupted_sets and its CLI): layout,
equality with on-the-fly dcls_mm.Corrupt, resume after a kill, errors."""
import json
import os
import os.path as osp
import subprocess
import sys

import cv2
import numpy as np
import pytest
from mmcv.transforms import LoadImageFromFile

from dcls_mm.datasets.transforms import Corrupt
from dcls_mm.evaluation import corrupted_sets
from dcls_mm.evaluation.corrupted_sets import list_images, make_corrupted
from dcls_mm.evaluation.records import FingerprintMismatch
from tests._helpers import ROOT

WNIDS = ('n01440764', 'n01443537')


@pytest.fixture()
def imagenet_val(tmp_path):
    """ImageNet val layout: val/<wnid>/ILSVRC2012_val_<8 digits>.JPEG (and a stray text
    file and a hidden file, which are not images)."""
    rng = np.random.default_rng(0)
    src = tmp_path / 'val'
    for i in range(3):
        folder = src / WNIDS[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        img = cv2.GaussianBlur(rng.integers(0, 256, (40, 52, 3)).astype(np.uint8), (5, 5), 0)
        cv2.imwrite(str(folder / f'ILSVRC2012_val_{i + 1:08d}.JPEG'), img)
    (src / 'LOC_val_solution.txt').write_text('not an image\n')
    (src / WNIDS[0] / '.DS_Store').write_bytes(b'\0')
    return str(src)


RELS = ['n01440764/ILSVRC2012_val_00000001.JPEG', 'n01440764/ILSVRC2012_val_00000003.JPEG',
        'n01443537/ILSVRC2012_val_00000002.JPEG']


def on_the_fly(path, corruption, severity, seed):
    results = LoadImageFromFile()(dict(img_path=path))
    return Corrupt(corruption, severity, seed)(results)['img']


def test_layout_and_equality_with_the_transform(imagenet_val, tmp_path):
    out = str(tmp_path / 'imagenet-c')
    done = make_corrupted(imagenet_val, out, ['gaussian_noise', 'frost'], [1, 3], seed=5,
                          workers=2, progress=False)
    assert sorted(done) == ['frost/1', 'frost/3', 'gaussian_noise/1', 'gaussian_noise/3']
    assert list_images(imagenet_val) == RELS
    written = sorted(osp.relpath(osp.join(d, f), out) for d, _, files in os.walk(out)
                     for f in files)
    want = sorted(f'{c}/{s}/{rel}' for c in ('gaussian_noise', 'frost') for s in (1, 3)
                  for rel in RELS) + ['records.jsonl']
    assert written == want
    for c in ('gaussian_noise', 'frost'):
        for s in (1, 3):
            for rel in RELS:
                path = osp.join(out, c, str(s), rel)
                with open(path, 'rb') as f:  # lossless PNG data under the original name
                    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
                loaded = LoadImageFromFile()(dict(img_path=path))['img']
                np.testing.assert_array_equal(
                    loaded, on_the_fly(osp.join(imagenet_val, rel), c, s, 5))


def test_resume_after_a_kill(imagenet_val, tmp_path, monkeypatch):
    out = str(tmp_path / 'c')
    calls = []
    real = corrupted_sets.corrupt_file

    def dying(*args):
        if len(calls) == 4:
            raise KeyboardInterrupt  # the run is killed after 4 files
        calls.append(args[1])
        real(*args)

    monkeypatch.setattr(corrupted_sets, 'corrupt_file', dying)
    with pytest.raises(KeyboardInterrupt):
        make_corrupted(imagenet_val, out, ['contrast', 'fog'], [2], progress=False)
    monkeypatch.setattr(corrupted_sets, 'corrupt_file', real)
    stamps = {p: os.stat(p).st_mtime_ns for p in calls}
    with open(osp.join(out, 'records.jsonl')) as f:
        assert [json.loads(line).get('key') for line in f][1:] == ['contrast/2']
    done = make_corrupted(imagenet_val, out, ['contrast', 'fog'], [2], progress=False)
    assert done == {'fog/2': dict(images=3, written=2, seconds=done['fog/2']['seconds'])}
    assert {p: os.stat(p).st_mtime_ns for p in calls} == stamps  # not rewritten
    fresh = str(tmp_path / 'fresh')
    make_corrupted(imagenet_val, fresh, ['fog'], [2], progress=False)
    for rel in RELS:
        a = cv2.imread(osp.join(out, 'fog', '2', rel))
        np.testing.assert_array_equal(a, cv2.imread(osp.join(fresh, 'fog', '2', rel)))
    # a complete set whose file was deleted: only that file is made again
    os.remove(osp.join(out, 'fog', '2', RELS[0]))
    assert make_corrupted(imagenet_val, out, ['contrast', 'fog'], [2],
                          progress=False)['fog/2']['written'] == 1
    assert make_corrupted(imagenet_val, out, ['contrast', 'fog'], [2], progress=False) == {}


def test_other_settings_into_the_same_folder_are_refused(imagenet_val, tmp_path):
    out = str(tmp_path / 'c')
    make_corrupted(imagenet_val, out, ['contrast'], [1], seed=0, progress=False)
    with pytest.raises(FingerprintMismatch, match='seed: 0 -> 1'):
        make_corrupted(imagenet_val, out, ['contrast'], [1], seed=1, progress=False)
    with pytest.raises(FingerprintMismatch, match="format: 'png' -> 'jpeg'"):
        make_corrupted(imagenet_val, out, ['contrast'], [1], fmt='jpeg', progress=False)


def test_bad_arguments(imagenet_val, tmp_path):
    out = str(tmp_path / 'c')
    with pytest.raises(ValueError, match='is not a folder'):
        make_corrupted(str(tmp_path / 'nope'), out, ['fog'], [1])
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='holds no image files'):
        make_corrupted(str(tmp_path / 'empty'), out, ['fog'], [1])
    with pytest.raises(ValueError, match='must not be inside the source folder'):
        make_corrupted(imagenet_val, osp.join(imagenet_val, 'c'), ['fog'], [1])
    for severities in ([0], [6]):
        with pytest.raises(ValueError, match='outside 1..5'):
            make_corrupted(imagenet_val, out, ['fog'], severities)
    with pytest.raises(ValueError, match="unknown corruption 'rain'"):
        make_corrupted(imagenet_val, out, ['rain'], [1])
    bad = tmp_path / 'bad'
    bad.mkdir()
    (bad / '000000000139.jpg').write_bytes(b'not a jpeg')
    with pytest.raises(ValueError, match='000000000139.jpg is not a readable image'):
        make_corrupted(str(bad), out, ['fog'], [1], progress=False)


def test_cli_jpeg_and_errors(imagenet_val, tmp_path):
    out = str(tmp_path / 'c')
    cli = [sys.executable, osp.join(ROOT, 'tools/robustness/make_corrupted.py')]
    run = subprocess.run(cli + [imagenet_val, out, '--corruptions', 'pixelate', 'noise',
                                '--severities', '5', '--format', 'jpeg', '--quality', '90',
                                '--workers', '1'], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert 'sets 4/4' in run.stderr  # the run-level progress line
    assert sorted(os.listdir(out)) == ['gaussian_noise', 'impulse_noise', 'pixelate',
                                       'records.jsonl', 'shot_noise']
    path = osp.join(out, 'pixelate', '5', RELS[0])
    with open(path, 'rb') as f:
        assert f.read(2) == b'\xff\xd8'  # JPEG data
    want = on_the_fly(osp.join(imagenet_val, RELS[0]), 'pixelate', 5, 0).astype(int)
    assert 0 < np.abs(cv2.imread(path).astype(int) - want).mean() < 6  # lossy, close
    bad = subprocess.run(cli + [imagenet_val, out, '--severities', '0'], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines()[-1] == (
        'make_corrupted.py: error: severity 0 is outside 1..5 (the clean set is the source '
        'folder itself)')
