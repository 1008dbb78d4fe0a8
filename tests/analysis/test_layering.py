"""dcls_mm.analysis is a top layer: nothing else in dcls_mm imports it, and importing it
pulls in neither mmdet nor mmseg."""
import subprocess
import sys


def test_nothing_below_imports_analysis_and_it_needs_no_downstream_package():
    code = ('import sys, dcls_mm.ops, dcls_mm.models, dcls_mm.engine, dcls_mm.datasets, '
            'dcls_mm.evaluation; below = "dcls_mm.analysis" in sys.modules; '
            'import dcls_mm.analysis; '
            'bad = [m for m in ("mmdet", "mmseg") if m in sys.modules]; '
            'print(below, bad); sys.exit(1 if below or bad else 0)')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
