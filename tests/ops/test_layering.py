"""dcls_mm.ops is the bottom layer: importing it must not pull in OpenMMLab or timm."""
import subprocess
import sys


def test_ops_import_needs_only_torch():
    code = ('import sys, dcls_mm, dcls_mm.ops; '
            'bad = [m for m in ("mmengine", "mmcv", "mmdet", "mmseg", "timm") if m in sys.modules]; '
            'print(bad); sys.exit(1 if bad else 0)')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
