"""Helpers shared by the test modules: the repository root and its scripts as modules.

Imported as ``from tests._helpers import ROOT, load_tool`` (``tests`` is a package, and
pytest puts the repository root on ``sys.path`` for it).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

#: the repository root (the folder holding ``dcls_mm/``, ``tools/`` and ``configs/``)
ROOT: Path = Path(__file__).resolve().parents[1]


def load_tool(relpath: str) -> ModuleType:
    """Load a script of the repository as a module, without running its ``__main__``.

    The scripts under ``tools/`` are not a package (``tools/test.py`` would shadow
    anything named ``test``), so they are loaded by path under a name unique to the
    path, and ``sys.path`` is left alone.

    Args:
        relpath: Path of the script relative to :data:`ROOT`, e.g.
            ``'tools/analysis/erf.py'``.

    Returns:
        The executed module (not registered in ``sys.modules``).

    Raises:
        FileNotFoundError: If the script does not exist.
    """
    path = ROOT / relpath
    if not path.is_file():
        raise FileNotFoundError(f'no script {relpath} under {ROOT}')
    name = 'dcls_mm_script_' + relpath.removesuffix('.py').replace('/', '_').replace('-', '_')
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_interpreted(code: str, **env: str) -> str:
    """Run ``code`` in a fresh Python with ``TRITON_INTERPRET=1`` (Triton kernels on the
    CPU; the flag is read when a kernel is defined, hence the new process) and return its
    standard output; fails the test with the error's end when the process fails."""
    import os
    import subprocess
    import sys
    import textwrap
    env = dict(os.environ, TRITON_INTERPRET='1', PYTHONPATH=str(ROOT), **env)
    proc = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout
