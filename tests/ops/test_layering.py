"""dcls_mm.ops is the bottom layer: importing it must not pull in OpenMMLab or timm."""
import subprocess
import sys


def test_ops_import_needs_only_torch():
    code = ('import sys, dcls_mm, dcls_mm.ops; '
            'bad = [m for m in ("mmengine", "mmcv", "mmdet", "mmseg", "timm") if m in sys.modules]; '
            'print(bad); sys.exit(1 if bad else 0)')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_ops_import_loads_no_higher_dcls_mm_module():
    # from the rest of the package only the atomic-write helper (the route cache uses it)
    code = ('import sys, dcls_mm.ops; '
            'print(sorted(m for m in sys.modules if m.startswith("dcls_mm.") '
            'and not m.startswith("dcls_mm.ops")))')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['dcls_mm.utils', 'dcls_mm.utils.fileio', 'dcls_mm.version']"
