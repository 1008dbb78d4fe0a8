"""The dcls-mm environment: the pinned stack is installed and its compiled ops work.

What is checked here is what the rest of the toolkit silently relies on:

* ``dcls_mm`` imports;
* torchvision's and mmcv's *compiled* ops run (a torchvision built for another torch, or
  an mmcv built without ``MMCV_WITH_OPS``, imports fine and fails only when an op is
  called), with results compared to plain NumPy / Python references written here;
* ``tools/env/setup.sh --check`` reports a missing, broken or incomplete environment in
  one clear message, without a Python traceback;
* the installed versions are the ones pinned in ``requirements/stack.txt``.
"""
from __future__ import annotations

import importlib.metadata as md
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests._helpers import ROOT, load_tool

STACK = ROOT / 'requirements' / 'stack.txt'
SETUP = ROOT / 'tools' / 'env' / 'setup.sh'


# --------------------------------------------------------------------------------------
# (a) the package itself
# --------------------------------------------------------------------------------------
def test_dcls_mm_imports_with_version():
    import dcls_mm
    assert isinstance(dcls_mm.__version__, str)
    assert re.fullmatch(r'\d+\.\d+\.\d+\S*', dcls_mm.__version__), dcls_mm.__version__
    # The installed distribution (editable install) reports the same version.
    assert md.version('dcls-mm') == dcls_mm.__version__


# --------------------------------------------------------------------------------------
# Independent references
# --------------------------------------------------------------------------------------
def _iou(a, b) -> float:
    """IoU of two (x1, y1, x2, y2) boxes, areas without the legacy +1 (offset 0)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def greedy_nms(boxes: np.ndarray, scores: np.ndarray, thr: float) -> list[int]:
    """Plain greedy NMS: keep by decreasing score, drop a box whose IoU with a kept box
    is above ``thr``."""
    keep: list[int] = []
    for i in np.argsort(-scores, kind='stable'):
        if all(_iou(boxes[i], boxes[j]) <= thr for j in keep):
            keep.append(int(i))
    return keep


def _bilinear(feat: np.ndarray, y: float, x: float) -> float:
    """Bilinear sample of a (H, W) map as RoIAlign does it: zero outside [-1, H] x
    [-1, W], coordinates clamped to the border inside that band."""
    h, w = feat.shape
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return 0.0
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= h - 1:
        y0 = y1 = h - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= w - 1:
        x0 = x1 = w - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    hy, hx = 1.0 - ly, 1.0 - lx
    return (hy * hx * feat[y0, x0] + hy * lx * feat[y0, x1] + ly * hx * feat[y1, x0] +
            ly * lx * feat[y1, x1])


def roi_align_reference(feat: np.ndarray, rois: np.ndarray, out_hw: tuple[int, int],
                        scale: float, sampling_ratio: int) -> np.ndarray:
    """RoIAlign (average pooling, ``aligned=True``) written from its definition: each
    output bin averages ``sampling_ratio**2`` bilinear samples at the centres of a
    regular grid inside the bin; box corners are shifted by half a pixel."""
    assert sampling_ratio > 0
    ph_n, pw_n = out_hw
    out = np.zeros((len(rois), feat.shape[1], ph_n, pw_n))
    for k, (b, x1, y1, x2, y2) in enumerate(rois):
        sx, sy = x1 * scale - 0.5, y1 * scale - 0.5
        bw, bh = (x2 - x1) * scale / pw_n, (y2 - y1) * scale / ph_n
        for c in range(feat.shape[1]):
            fmap = feat[int(b), c]
            for ph in range(ph_n):
                for pw in range(pw_n):
                    acc = 0.0
                    for iy in range(sampling_ratio):
                        y = sy + ph * bh + (iy + 0.5) * bh / sampling_ratio
                        for ix in range(sampling_ratio):
                            x = sx + pw * bw + (ix + 0.5) * bw / sampling_ratio
                            acc += _bilinear(fmap, y, x)
                    out[k, c, ph, pw] = acc / sampling_ratio**2
    return out


def _nms_case(seed: int = 0, n: int = 40):
    """Boxes in a few overlapping clusters (so that NMS suppresses), distinct scores."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(20, 80, size=(4, 2))
    c = centres[rng.integers(0, 4, size=n)] + rng.normal(0, 4, size=(n, 2))
    wh = rng.uniform(8, 30, size=(n, 2))
    boxes = np.concatenate([c - wh / 2, c + wh / 2], axis=1).astype(np.float32)
    scores = rng.permutation(np.linspace(0.05, 0.95, n)).astype(np.float32)
    return boxes, scores


# Feature map and boxes for RoIAlign: inside, partly outside, the other image, sub-pixel.
_FEAT = np.random.default_rng(1).normal(size=(2, 3, 7, 9)).astype(np.float32)
_ROIS = np.array([
    [0, 1.3, 0.7, 6.1, 5.2],
    [0, -2.3, -1.6, 4.4, 3.9],
    [1, 3.2, 2.1, 10.7, 8.3],
    [1, 2.2, 3.1, 2.9, 3.4],
], dtype=np.float32)


# --------------------------------------------------------------------------------------
# (b) torchvision and timm
# --------------------------------------------------------------------------------------
def test_torchvision_nms_runs_and_matches_greedy_reference():
    import torchvision
    boxes, scores = _nms_case(seed=0)
    for thr in (0.3, 0.5, 0.7):
        keep = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), thr)
        expected = greedy_nms(boxes, scores, thr)
        assert keep.tolist() == expected
    assert 0 < len(greedy_nms(boxes, scores, 0.3)) < len(boxes)  # the case suppresses


def test_timm_imports_and_builds_a_layer():
    import timm
    from timm.layers import DropPath
    assert timm.__version__
    assert DropPath(0.1).eval()(torch.ones(2, 3)).eq(1).all()


# --------------------------------------------------------------------------------------
# (c) mmcv's compiled ops on the CPU
# --------------------------------------------------------------------------------------
def test_mmcv_was_built_with_its_ops():
    from mmcv.ops import get_compiler_version
    assert get_compiler_version()  # raises/empty when mmcv._ext is missing


@pytest.mark.parametrize('thr', [0.3, 0.5, 0.7])
def test_mmcv_nms_matches_greedy_reference(thr):
    from mmcv.ops import nms
    boxes, scores = _nms_case(seed=2)
    dets, inds = nms(torch.from_numpy(boxes), torch.from_numpy(scores), thr)
    expected = greedy_nms(boxes, scores, thr)
    assert inds.tolist() == expected
    assert dets.shape == (len(expected), 5)
    np.testing.assert_allclose(dets[:, :4].numpy(), boxes[expected])
    np.testing.assert_allclose(dets[:, 4].numpy(), scores[expected])


def test_mmcv_roi_align_matches_numpy_reference():
    from mmcv.ops import roi_align
    out = roi_align(torch.from_numpy(_FEAT), torch.from_numpy(_ROIS), (3, 3),
                    spatial_scale=1.0, sampling_ratio=2, pool_mode='avg', aligned=True)
    ref = roi_align_reference(_FEAT, _ROIS, (3, 3), 1.0, 2)
    assert out.shape == (len(_ROIS), 3, 3, 3)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-5)


def test_mmcv_roi_align_simple_value():
    """A 2x2 box on a ramp, one bin, one sample: the bilinear value at its centre."""
    from mmcv.ops import roi_align
    feat = torch.arange(16.).view(1, 1, 4, 4)  # value = 4 * y + x
    # aligned box [1, 3] x [1, 3] -> pixel-centre coordinates [0.5, 2.5]; centre (1.5, 1.5)
    out = roi_align(feat, torch.tensor([[0., 1., 1., 3., 3.]]), (1, 1), 1.0, 1, 'avg', True)
    assert out.item() == pytest.approx(4 * 1.5 + 1.5)


def test_mmcv_roialign_module_and_backward():
    from mmcv.ops import RoIAlign
    layer = RoIAlign((2, 4), spatial_scale=0.5, sampling_ratio=2, pool_mode='avg',
                     aligned=True)
    rois = _ROIS * np.array([1, 2, 2, 2, 2], dtype=np.float32)  # image coords at scale 0.5
    feat = torch.from_numpy(_FEAT).requires_grad_(True)
    out = layer(feat, torch.from_numpy(rois))
    ref = roi_align_reference(_FEAT, rois, (2, 4), 0.5, 2)
    np.testing.assert_allclose(out.detach().numpy(), ref, rtol=1e-5, atol=1e-5)

    # Backward: for a box well inside the map, the bilinear weights of each sample sum to
    # one, so d(sum of its outputs)/d(input) sums to the number of outputs.
    inside = torch.tensor([[0., 2.6, 2.2, 12.2, 10.4]])
    feat.grad = None
    layer(feat, inside).sum().backward()
    assert feat.grad[0].sum().item() == pytest.approx(3 * 2 * 4, rel=1e-5)
    assert feat.grad[1].abs().sum().item() == 0.0


# --------------------------------------------------------------------------------------
# (d) the set-up command on a missing / broken / incomplete environment
# --------------------------------------------------------------------------------------
def _run_check(venv: Path | str, timeout: float = 300) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ('PYTHONPATH', 'PYTHONHOME', 'PYTHONSTARTUP')}
    env['DCLS_MM_VENV'] = str(venv)
    p = subprocess.run(['bash', str(SETUP), '--check'], cwd=ROOT, env=env,
                       stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=timeout)
    return p.returncode, p.stdout + p.stderr


def _assert_clear_failure(rc: int, out: str, *phrases: str) -> None:
    assert rc != 0, out
    assert 'Traceback' not in out, out
    for phrase in phrases:
        assert phrase in out, out
    # One ERROR line that tells what to do.
    assert 'bash tools/env/setup.sh' in out, out


def _make_bare_venv(path: Path) -> Path:
    """A real virtual environment whose python runs but has nothing installed."""
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(path)], check=True,
                   capture_output=True, timeout=120)
    return path


def _site_packages(venv: Path) -> Path:
    out = subprocess.run([str(venv / 'bin' / 'python'), '-c',
                          'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                         check=True, capture_output=True, text=True).stdout.strip()
    return Path(out)


def _fake_dist(site: Path, name: str, version: str, init_source: str) -> None:
    """Install a fake package ``name`` (with metadata saying ``version``) whose import
    runs ``init_source``: what a half-deleted or mis-built package looks like."""
    info = site / f'{name}-{version}.dist-info'
    info.mkdir(parents=True)
    (info / 'METADATA').write_text(
        f'Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n')
    pkg = site / name
    pkg.mkdir()
    (pkg / '__init__.py').write_text(init_source)


def test_setup_check_missing_environment(tmp_path):
    rc, out = _run_check(tmp_path / 'does-not-exist')
    _assert_clear_failure(rc, out, 'no dcls-mm environment')


def test_setup_check_python_not_executable(tmp_path):
    venv = tmp_path / 'venv'
    (venv / 'bin').mkdir(parents=True)
    (venv / 'bin' / 'python').write_text('not a program\n')  # mode 644
    rc, out = _run_check(venv)
    _assert_clear_failure(rc, out, 'does not run')


def test_setup_check_python_broken_symlink(tmp_path):
    venv = tmp_path / 'venv'
    (venv / 'bin').mkdir(parents=True)
    (venv / 'bin' / 'python').symlink_to(tmp_path / 'gone' / 'python3.11')
    rc, out = _run_check(venv)
    _assert_clear_failure(rc, out, 'does not run')


def test_setup_check_python_that_fails(tmp_path):
    venv = tmp_path / 'venv'
    (venv / 'bin').mkdir(parents=True)
    py = venv / 'bin' / 'python'
    py.write_text('#!/bin/sh\nexit 3\n')
    py.chmod(0o755)
    rc, out = _run_check(venv)
    _assert_clear_failure(rc, out, 'does not run')


def test_setup_check_venv_path_is_a_file(tmp_path):
    f = tmp_path / 'venv'
    f.write_text('')
    rc, out = _run_check(f)
    _assert_clear_failure(rc, out, 'does not run')


def test_setup_check_incomplete_venv(tmp_path):
    venv = _make_bare_venv(tmp_path / 'venv')
    rc, out = _run_check(venv)
    pins = _read_pins()
    _assert_clear_failure(rc, out, 'incomplete', f'torch is not installed (pinned {pins["torch"]})',
                          'mmcv is not installed')


def test_setup_check_corrupted_package(tmp_path):
    """torch's metadata is there but importing it fails (a deleted shared library)."""
    venv = _make_bare_venv(tmp_path / 'venv')
    _fake_dist(_site_packages(venv), 'torch', _read_pins()['torch'],
               'raise ImportError("libtorch_cpu.so: cannot open shared object file")\n')
    rc, out = _run_check(venv)
    _assert_clear_failure(rc, out, 'torch failed: ImportError: libtorch_cpu.so',
                          'rm -rf')
    assert 'torch is not installed' not in out


def test_setup_check_package_that_crashes_the_interpreter(tmp_path):
    """A compiled package that segfaults on import kills the check itself."""
    venv = _make_bare_venv(tmp_path / 'venv')
    _fake_dist(_site_packages(venv), 'torch', _read_pins()['torch'],
               'import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n')
    rc, out = _run_check(venv)
    _assert_clear_failure(rc, out, 'crashed', 'rm -rf')


def test_setup_check_complete_environment():
    """The environment running these tests passes the same check (all imports + ops)."""
    venv = Path(sys.prefix)
    if sys.prefix == sys.base_prefix or not (venv / 'bin' / 'python').exists():
        pytest.skip('the tests are not running inside a virtual environment')
    rc, out = _run_check(venv)
    assert rc == 0, out
    assert 'is complete' in out, out
    assert 'Traceback' not in out, out


# --------------------------------------------------------------------------------------
# (e) installed versions are the pinned ones
# --------------------------------------------------------------------------------------
def _check_env_module():
    return load_tool('tools/env/check_env.py')


def _read_pins() -> dict[str, str]:
    return _check_env_module().read_pins(STACK)


def test_read_pins_parses_stack_file(tmp_path):
    pins = _read_pins()
    for dist in ('torch', 'torchvision', 'mmcv', 'mmengine', 'mmdet', 'mmsegmentation',
                 'timm', 'numpy', 'setuptools', 'pytest'):
        assert re.fullmatch(r'\d+(\.\d+)*', pins[dist]), (dist, pins.get(dist))
    # Comments, blank lines and surrounding spaces are tolerated; names are lower-cased.
    f = tmp_path / 'stack.txt'
    f.write_text('# comment torch==0.0\n\n  Foo_Bar==1.2.3  \nbaz>=2\nqux==4.5 # trailing\n')
    got = _check_env_module().read_pins(f)
    assert got['foo_bar'] == '1.2.3'
    assert 'baz' not in got and 'torch' not in got


@pytest.mark.parametrize('dist', ['torch', 'torchvision', 'mmcv', 'mmengine', 'mmdet',
                                  'mmsegmentation'])
def test_installed_version_equals_pin(dist):
    pins = _read_pins()
    installed = md.version(dist)
    assert installed.split('+')[0] == pins[dist], (
        f'{dist} {installed} is installed, requirements/stack.txt pins {pins[dist]}: '
        'run bash tools/env/setup.sh')


def test_torch_is_the_pypi_build():
    """The local '+cpu' torch breaks torchvision's compiled ops (see stack.txt)."""
    assert '+cpu' not in md.version('torch')


def test_versions_live_only_in_stack_txt():
    """pyproject.toml names its dependencies without versions; the Docker image reads
    its versions from stack.txt instead of repeating them."""
    tomllib = pytest.importorskip('tomllib', reason='tomllib needs Python >= 3.11')
    project = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']
    deps = list(project['dependencies'])
    for extra in project.get('optional-dependencies', {}).values():
        deps += extra
    for dep in deps:
        assert re.fullmatch(r'[A-Za-z0-9_.\-]+', dep), f'{dep!r} carries a version'
    dockerfile = ROOT / 'docker' / 'Dockerfile'
    if dockerfile.exists():
        text = dockerfile.read_text()
        assert 'requirements/stack.txt' in text
        for dist, version in _read_pins().items():
            assert not re.search(rf'\b{re.escape(dist)}==', text, re.I), (
                f'docker/Dockerfile pins {dist}; take it from requirements/stack.txt')
            assert f'{dist}=={version}' not in text


def test_math_reference_self_check():
    """The references themselves, on cases small enough to do by hand."""
    assert _iou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7)
    assert greedy_nms(np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], float),
                      np.array([0.9, 0.8, 0.7]), 0.5) == [0, 2]
    ramp = np.arange(16.).reshape(4, 4)
    assert _bilinear(ramp, 1.5, 2.25) == pytest.approx(4 * 1.5 + 2.25)
    assert _bilinear(ramp, -1.5, 0) == 0.0
    assert _bilinear(ramp, 3.5, 0) == ramp[3, 0]  # clamped to the last row
    assert math.isclose(
        roi_align_reference(ramp[None, None], np.array([[0, 1, 1, 3, 3]]), (1, 1), 1, 1)[0, 0, 0, 0],
        7.5)
