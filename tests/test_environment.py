"""The dcls-mm environment: the pinned stack is installed and its compiled ops work.

What is checked here is what the rest of the toolkit silently relies on:

* ``dcls_mm`` imports;
* the environment check (``tools/env/check_env.py``, run by ``tools/env/setup.sh``)
  passes: installed versions equal the pins of ``requirements/stack.txt``, and
  torchvision's and mmcv's *compiled* ops agree with the check's plain-Python references
  (the op-by-op comparisons live in the check, which every set-up runs; here it runs once,
  and its references are checked by hand);
* ``tools/env/setup.sh --check`` reports a missing, broken or incomplete environment in
  one clear message, without a Python traceback;
* the versions are pinned in ``requirements/stack.txt`` only.
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
# (b) the environment check itself: compiled ops against its references, pins
# --------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def check_env():
    return load_tool('tools/env/check_env.py')


def test_environment_check_passes_and_reports_what_it_finds(check_env, tmp_path, monkeypatch):
    """The one run of the environment check in the suite: the running environment
    passes all of it (pins, imports, torchvision's and mmcv's compiled ops against the
    references); a wrong pin and an op that misbehaves are each reported in one line."""
    assert check_env.find_problems(STACK) == []

    stack = tmp_path / 'stack.txt'
    stack.write_text(STACK.read_text().replace(f'torch=={_read_pins()["torch"]}',
                                               'torch==0.0.1'))
    assert check_env.find_problems(stack) == [
        f'torch {md.version("torch")} is installed, requirements/stack.txt pins 0.0.1']

    import torchvision
    nms = torchvision.ops.nms
    monkeypatch.setattr(torchvision.ops, 'nms', lambda *args: nms(*args).flip(0))
    problems = check_env.find_problems(STACK)
    assert len(problems) == 1, problems
    assert problems[0].startswith('torchvision compiled ops (nms) failed: RuntimeError: '
                                  'torchvision.ops.nms at IoU 0.3 gave ['), problems


def test_check_env_references_by_hand(check_env):
    """The references of the environment check, on cases small enough to do by hand."""
    assert check_env.iou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7)
    assert check_env.greedy_nms([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]],
                                [0.9, 0.8, 0.7], 0.5) == [0, 2]
    ramp = np.arange(16.).reshape(4, 4).tolist()
    assert check_env.bilinear(ramp, 1.5, 2.25) == pytest.approx(4 * 1.5 + 2.25)
    assert check_env.bilinear(ramp, -1.5, 0) == 0.0
    assert check_env.bilinear(ramp, 3.5, 0) == ramp[3][0]  # clamped to the last row
    out = check_env.roi_align_reference([[ramp]], [[0, 1, 1, 3, 3]], (1, 1), 1, 1)
    assert math.isclose(out[0][0][0][0], 7.5)


# --------------------------------------------------------------------------------------
# (c) the set-up command on a missing / broken / incomplete environment
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


def _not_executable(py: Path) -> None:
    py.write_text('not a program\n')  # mode 644


def _broken_symlink(py: Path) -> None:
    py.symlink_to(py.parent / 'gone' / 'python3.11')


def _exits_with_an_error(py: Path) -> None:
    py.write_text('#!/bin/sh\nexit 3\n')
    py.chmod(0o755)


@pytest.mark.parametrize('make_python', [_not_executable, _broken_symlink, _exits_with_an_error])
def test_setup_check_python_that_does_not_run(tmp_path, make_python):
    venv = tmp_path / 'venv'
    (venv / 'bin').mkdir(parents=True)
    make_python(venv / 'bin' / 'python')
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


@pytest.mark.slow  # the whole check again, in a fresh interpreter (imports everything)
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
# (d) the pins live in requirements/stack.txt only
# --------------------------------------------------------------------------------------
def _read_pins() -> dict[str, str]:
    return load_tool('tools/env/check_env.py').read_pins(STACK)


def test_read_pins_parses_stack_file(check_env, tmp_path):
    pins = _read_pins()
    for dist in ('torch', 'torchvision', 'mmcv', 'mmengine', 'mmdet', 'mmsegmentation',
                 'timm', 'numpy', 'setuptools', 'pytest'):
        assert re.fullmatch(r'\d+(\.\d+)*', pins[dist]), (dist, pins.get(dist))
    # Comments, blank lines and surrounding spaces are tolerated; names are lower-cased.
    f = tmp_path / 'stack.txt'
    f.write_text('# comment torch==0.0\n\n  Foo_Bar==1.2.3  \nbaz>=2\nqux==4.5 # trailing\n')
    got = check_env.read_pins(f)
    assert got['foo_bar'] == '1.2.3'
    assert 'baz' not in got and 'torch' not in got


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
