"""The ``dcls_mm`` registry scope resolves from mmdet's and mmseg's registries.

A config of either downstream toolkit says ``type='dcls_mm.ConvNeXtDCLS'`` with no
``custom_imports``: MMEngine must find the ``dcls_mm`` scope by importing
``dcls_mm.registry``, and that registry's ``locations`` must import the implementation.

Each check runs in a fresh interpreter, so that nothing imported by this test session
(or by other test modules, e.g. ``dcls_mm.models``) can mask a failure. MMEngine's last
resort in ``Registry.get`` -- importing ``'dcls_mm.ConvNeXtDCLS'`` as a dotted Python
path -- is disabled in those interpreters, so a lookup that succeeds went through the
registry tree.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import pytest

from tests._helpers import ROOT

REGISTRIES = {  # name in dcls_mm.registry -> its ``locations``
    'MODELS': ['dcls_mm.models'],
    'HOOKS': ['dcls_mm.engine'],
    'OPTIM_WRAPPER_CONSTRUCTORS': ['dcls_mm.engine'],
    'DATASETS': ['dcls_mm.datasets'],
    'METRICS': ['dcls_mm.evaluation'],
    'TRANSFORMS': ['dcls_mm.datasets'],
}

# Prepended to every script: no dotted-path fallback, and a helper to list what of
# dcls_mm is imported.
_PRELUDE = '''
import json, sys
import mmengine.registry.registry as _registry_module

def _no_fallback(key):
    raise LookupError(f'{key!r} was not found through the registry tree')

_registry_module.get_object_from_string = _no_fallback

def dcls_modules():
    return sorted(m for m in sys.modules if m == 'dcls_mm' or m.startswith('dcls_mm.'))
'''


def run_fresh(script: str, timeout: float = 300) -> dict:
    """Run ``script`` in a new interpreter (repo root as cwd) and return the JSON object
    it prints on its last line."""
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(ROOT), env.get('PYTHONPATH')]))
    p = subprocess.run([sys.executable, '-c', _PRELUDE + textwrap.dedent(script)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 0, f'subprocess failed:\n{p.stdout}\n{p.stderr}'
    lines = p.stdout.strip().splitlines()
    assert lines, f'no output:\n{p.stderr}'
    return json.loads(lines[-1])


# --------------------------------------------------------------------------------------
# Probe classes registered in dcls_mm's registries, looked up from mmdet and mmseg.
# --------------------------------------------------------------------------------------
PROBE_SCRIPT = '''
from mmengine import registry as mme
from mmengine.registry import init_default_scope
import mmdet.registry as det
import mmseg.registry as seg

res = {'imported_before': dcls_modules()}

# 1. A scoped lookup from mmdet, with nothing of dcls_mm imported yet, must import
#    dcls_mm.registry (adding the scope to the tree) and its MODELS locations.
init_default_scope('mmdet')
try:
    det.MODELS.get('dcls_mm.NoSuchModelForTheProbe')
    res['missing'] = 'found?!'
except Exception as exc:  # MMEngine raises RuntimeError('Failed to get ...')
    res['missing'] = type(exc).__name__
res['imported_after_lookup'] = dcls_modules()

import dcls_mm.registry as R

res['registries'] = {}
for name in %(names)r:
    reg, root = getattr(R, name), getattr(mme, name)
    res['registries'][name] = {
        'scope': reg.scope,
        'parent_is_mmengine_root': reg.parent is root,
        'child_of_root': root.children.get('dcls_mm') is reg,
        'locations': list(reg._locations),
    }

# 2. Probe classes registered in dcls_mm's registries.
@R.MODELS.register_module()
class DclsMmProbeModel:
    def __init__(self, width=1):
        self.width = width

@R.HOOKS.register_module()
class DclsMmProbeHook:
    pass

@R.OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class DclsMmProbeConstructor:
    def __init__(self, optim_wrapper_cfg=None, paramwise_cfg=None):
        self.optim_wrapper_cfg = optim_wrapper_cfg

lookups = {}
for tk, pkg in (('mmdet', det), ('mmseg', seg)):
    lookups[tk + '.MODELS'] = pkg.MODELS.get('dcls_mm.DclsMmProbeModel') is DclsMmProbeModel
    lookups[tk + '.HOOKS'] = pkg.HOOKS.get('dcls_mm.DclsMmProbeHook') is DclsMmProbeHook
    lookups[tk + '.OPTIM_WRAPPER_CONSTRUCTORS'] = (
        pkg.OPTIM_WRAPPER_CONSTRUCTORS.get('dcls_mm.DclsMmProbeConstructor')
        is DclsMmProbeConstructor)
lookups['mmengine.MODELS'] = mme.MODELS.get('dcls_mm.DclsMmProbeModel') is DclsMmProbeModel
res['lookups'] = lookups

# 3. build() from a downstream registry, as a config would, under each default scope.
built = {}
m = det.MODELS.build(dict(type='dcls_mm.DclsMmProbeModel', width=3))
built['mmdet.MODELS'] = [type(m).__name__, m.width]
h = det.HOOKS.build(dict(type='dcls_mm.DclsMmProbeHook'))
built['mmdet.HOOKS'] = [type(h).__name__]
c = det.OPTIM_WRAPPER_CONSTRUCTORS.build(
    dict(type='dcls_mm.DclsMmProbeConstructor', optim_wrapper_cfg=dict(lr=0.1)))
built['mmdet.OPTIM_WRAPPER_CONSTRUCTORS'] = [type(c).__name__, c.optim_wrapper_cfg]
init_default_scope('mmseg')
m = seg.MODELS.build(dict(type='dcls_mm.DclsMmProbeModel', width=5))
built['mmseg.MODELS'] = [type(m).__name__, m.width]
res['built'] = built
print(json.dumps(res))
''' % {'names': list(REGISTRIES)}


@pytest.fixture(scope='module')
def probe():
    return run_fresh(PROBE_SCRIPT)


def test_mmdet_and_mmseg_do_not_import_dcls_mm_themselves(probe):
    assert probe['imported_before'] == []


def test_scoped_lookup_imports_registry_and_locations(probe):
    assert probe['missing'] == 'RuntimeError'  # not found, and said so
    imported = probe['imported_after_lookup']
    assert 'dcls_mm.registry' in imported
    assert 'dcls_mm.models' in imported  # MODELS' locations, imported on first use


@pytest.mark.parametrize('name', list(REGISTRIES))
def test_registry_is_scoped_child_of_mmengine_root(probe, name):
    info = probe['registries'][name]
    assert info == {
        'scope': 'dcls_mm',
        'parent_is_mmengine_root': True,
        'child_of_root': True,
        'locations': REGISTRIES[name],
    }


@pytest.mark.parametrize('where', [
    'mmdet.MODELS', 'mmseg.MODELS', 'mmdet.HOOKS', 'mmseg.HOOKS',
    'mmdet.OPTIM_WRAPPER_CONSTRUCTORS', 'mmseg.OPTIM_WRAPPER_CONSTRUCTORS',
    'mmengine.MODELS'
])
def test_probe_class_found_through_downstream_registry(probe, where):
    assert probe['lookups'][where] is True


def test_probe_built_from_downstream_registries(probe):
    assert probe['built'] == {
        'mmdet.MODELS': ['DclsMmProbeModel', 3],
        'mmdet.HOOKS': ['DclsMmProbeHook'],
        'mmdet.OPTIM_WRAPPER_CONSTRUCTORS': ['DclsMmProbeConstructor', {'lr': 0.1}],
        'mmseg.MODELS': ['DclsMmProbeModel', 5],
    }


# --------------------------------------------------------------------------------------
# The real backbone, once it exists.
# --------------------------------------------------------------------------------------
BACKBONE_SCRIPT = '''
from mmengine.registry import init_default_scope
import mmdet.registry as det
import mmseg.registry as seg

res = {'imported_before': dcls_modules()}
init_default_scope('mmdet')
det_cls = det.MODELS.get('dcls_mm.ConvNeXtDCLS')
init_default_scope('mmseg')
seg_cls = seg.MODELS.get('dcls_mm.ConvNeXtDCLS')

import dcls_mm.models
from dcls_mm.registry import MODELS
res['mmdet'] = det_cls is MODELS.module_dict['ConvNeXtDCLS']
res['mmseg'] = seg_cls is MODELS.module_dict['ConvNeXtDCLS']
res['export'] = getattr(dcls_mm.models, 'ConvNeXtDCLS', None) is det_cls
res['module'] = det_cls.__module__
print(json.dumps(res))
'''


def test_convnext_dcls_resolves_from_mmdet_and_mmseg():
    res = run_fresh(BACKBONE_SCRIPT)
    assert res['imported_before'] == []
    assert res['mmdet'] is True and res['mmseg'] is True
    assert res['export'] is True, 'dcls_mm.models should export ConvNeXtDCLS'
    assert res['module'].startswith('dcls_mm.models')
