"""Module behaviour: buffers, dtypes, autocast, compile/export, copies, errors, fuzzing."""
import copy
import inspect
import logging
import pickle
import re
import warnings

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dcls_mm.ops import (Dcls1d, Dcls2_1d, Dcls2d, Dcls2dK1d, Dcls3_1d, Dcls3d,
                         convert_reference_state_dict)
from dcls_mm.ops.kernel import canonical_interpolation

from .dense_reference import reference_gauss_axis_kernel


def test_index_buffers_follow_to_and_stay_out_of_state_dict():
    m = Dcls2d(2, 2, 3, dilated_kernel_size=(7, 5), interpolation='gauss')
    buffers = dict(m.named_buffers())
    assert set(buffers) == {'grid0', 'grid1'}
    assert set(m.state_dict()) == {'weight', 'P', 'SIG', 'bias'}
    m = m.to(torch.float64)
    assert all(b.dtype == torch.float64 for b in m.buffers())
    assert m.construct_kernel().dtype == torch.float64
    if torch.cuda.is_available():  # pragma: no cover - CI has no GPU
        m = m.cuda()
        assert all(b.is_cuda for b in m.buffers())
        assert m.construct_kernel().is_cuda
    # a reference state dict (no buffers) loads strictly
    m.load_state_dict({k: v.clone() for k, v in m.state_dict().items()}, strict=True)


def test_autocast_builds_the_kernel_in_float32():
    m = Dcls2d(4, 4, 3, dilated_kernel_size=7, padding='same', groups=4, interpolation='gauss')
    x = torch.randn(2, 4, 10, 10)
    eager_kernel = m.construct_kernel()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        k = m.construct_kernel()
        y = m(x)
    assert k.dtype == torch.float32
    torch.testing.assert_close(k, eager_kernel)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), m(x), atol=5e-2, rtol=5e-2)


def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    m = Dcls2d(3, 6, 4, dilated_kernel_size=(7, 5), padding='same', interpolation='v0')
    x = torch.randn(2, 3, 12, 12)
    compiled = torch.compile(m)
    torch.testing.assert_close(compiled(x), m(x), rtol=1e-5, atol=1e-5)


def test_torch_export_matches_eager():
    torch.manual_seed(0)
    m = Dcls2d(3, 6, 4, dilated_kernel_size=(7, 5), padding=3, interpolation='gauss')
    x = torch.randn(2, 3, 12, 12)
    exported = torch.export.export(m, (x,))
    torch.testing.assert_close(exported.module()(x), m(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('cls,kwargs', [
    (Dcls1d, dict(dilated_kernel_size=5)), (Dcls2d, dict(dilated_kernel_size=5)),
    (Dcls3d, dict(dilated_kernel_size=3)), (Dcls2_1d, dict(dilated_kernel_size=5)),
    (Dcls3_1d, dict(dilated_kernel_size=5)), (Dcls2dK1d, dict(dilated_kernel_size=5)),
])
def test_deepcopy_and_pickle(cls, kwargs):
    m = cls(2, 2, 3, interpolation='gauss', **kwargs)
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        torch.testing.assert_close(clone.construct_kernel(), m.construct_kernel())
        assert clone.P is not m.P


def test_no_warning_or_log_at_construction(caplog):
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        with caplog.at_level(logging.DEBUG):
            for cls in (Dcls1d, Dcls2d, Dcls3d, Dcls2_1d, Dcls3_1d, Dcls2dK1d):
                cls(4, 4, 3, dilated_kernel_size=5, groups=4, padding='same')
    assert caplog.records == []


@pytest.mark.parametrize('kwargs,word', [
    (dict(kernel_count=0), 'kernel_count'),
    (dict(kernel_count=-2), 'kernel_count'),
    (dict(dilated_kernel_size=0), 'dilated_kernel_size'),
    (dict(dilated_kernel_size=(3, 3, 3)), 'dilated_kernel_size'),
    (dict(stride=(1, 1, 1)), 'stride'),
    (dict(stride=0), 'stride'),
    (dict(padding=(1,)), 'padding'),
    (dict(padding=-1), 'padding'),
    (dict(padding='full'), 'padding'),
    (dict(padding='same', stride=2), 'same'),
    (dict(groups=3), 'groups'),
    (dict(in_channels=0), 'in_channels'),
    (dict(version='cubic'), 'version'),
    (dict(interpolation='cubic'), 'interpolation'),
    (dict(padding_mode='mirror'), 'padding_mode'),
])
def test_invalid_arguments_raise_value_error(kwargs, word):
    args = dict(in_channels=4, out_channels=4, kernel_count=3, dilated_kernel_size=5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=word):
        Dcls2d(**args)


def test_invalid_inputs_raise_value_error():
    m = Dcls2d(4, 4, 3, dilated_kernel_size=7)
    with pytest.raises(ValueError, match='input channels'):
        m(torch.randn(1, 3, 10, 10))
    with pytest.raises(ValueError, match='4-D'):
        m(torch.randn(10, 10))
    with pytest.raises(ValueError, match='too small'):
        m(torch.randn(1, 4, 5, 10))
    with pytest.raises(ValueError, match='dense_kernel_size'):
        Dcls3_1d(2, 2, 3, dense_kernel_size=(1, 2, 3), dilated_kernel_size=5)
    with pytest.raises(ValueError, match='flat_dim'):
        Dcls2dK1d(2, 2, 3, dilated_kernel_size=5, flat_dim=2)


def test_version_aliases():
    for ref, readable in (('v0', 'bilinear'), ('max', 'triangle'), ('gauss', 'gaussian')):
        assert canonical_interpolation(ref) == canonical_interpolation(readable)
        assert Dcls2d(1, 1, 1, 3, interpolation=ref).interpolation == readable
        # the reference package's spelling still works, with a DeprecationWarning
        with pytest.warns(DeprecationWarning, match='interpolation='):
            layer = Dcls2d(1, 1, 1, 3, version=ref)
        with pytest.warns(DeprecationWarning, match='.interpolation'):
            assert layer.version == readable
        assert layer.interpolation == readable
    assert canonical_interpolation('v1') == 'bilinear_normalized'


@pytest.mark.parametrize('cls', [Dcls1d, Dcls2d, Dcls3d, Dcls2_1d, Dcls3_1d, Dcls2dK1d])
def test_deprecated_version_warning_names_the_callers_line(cls):
    with pytest.warns(DeprecationWarning, match='interpolation=') as record:
        cls(1, 1, 1, dilated_kernel_size=3, version='v0')
    assert record[0].filename == __file__


def test_deprecated_version_attribute_and_old_pickles():
    m = Dcls2d(1, 1, 1, 3, interpolation='v0')
    with pytest.warns(DeprecationWarning):
        m.version = 'v1'
    assert m.interpolation == 'bilinear_normalized'
    # a whole module pickled before the rename kept its interpolation as `version`
    state = m.__getstate__()
    state['version'] = state.pop('interpolation')
    old = Dcls2d.__new__(Dcls2d)
    old.__setstate__(state)
    assert old.interpolation == 'bilinear_normalized'
    torch.testing.assert_close(old.construct_kernel(), m.construct_kernel())


@pytest.mark.parametrize('cls', [Dcls1d, Dcls2d, Dcls3d, Dcls2_1d, Dcls3_1d, Dcls2dK1d])
def test_public_layers_document_every_argument(cls):
    """Each public layer's own docstring (what help() shows) has one Args line per
    constructor argument, with its default."""
    doc = cls.__doc__
    args = doc[doc.index('Args:'):]
    for name, param in inspect.signature(cls).parameters.items():
        entry = re.search(rf'\n {{8}}{name}: (.*?)(?=\n {{8}}\S|\s*\Z)', args, re.S)
        assert entry, name
        if param.default is not inspect.Parameter.empty and name != 'version':
            assert ' '.join(entry.group(1).split()).endswith(
                f'Defaults to {param.default}.') or f'``{param.default!r}``' in entry.group(1), name
    assert '_DclsNd' not in doc


@pytest.mark.parametrize('dks', [(9, 9), (9, 5), (4, 7)])
def test_convert_reference_gauss_state_dict(dks):
    torch.manual_seed(0)
    ref = {'weight': torch.randn(3, 1, 4, dtype=torch.float64),
           'P': torch.randn(2, 3, 1, 4, dtype=torch.float64),
           'SIG': torch.rand(2, 3, 1, 4, dtype=torch.float64),
           'bias': torch.zeros(3, dtype=torch.float64)}
    expected = reference_gauss_axis_kernel(ref['weight'], ref['P'], ref['SIG'], dks)
    m = Dcls2d(3, 3, 4, dilated_kernel_size=dks, groups=3, interpolation='gauss').double()
    m.load_state_dict(convert_reference_state_dict(ref, dks))
    torch.testing.assert_close(m.construct_kernel(), expected, rtol=1e-9, atol=1e-12)
    # loading without conversion transposes the kernel (the trap the helper avoids)
    m.load_state_dict(ref)
    assert not torch.allclose(m.construct_kernel(), expected)


_CLASSES = {
    'Dcls1d': (Dcls1d, 1), 'Dcls2d': (Dcls2d, 2), 'Dcls3d': (Dcls3d, 3),
    'Dcls2_1d': (Dcls2_1d, 2), 'Dcls3_1d': (Dcls3_1d, 3), 'Dcls2dK1d': (Dcls2dK1d, 2),
}
small_int = st.integers(min_value=-2, max_value=6)
size_arg = st.one_of(small_int, st.lists(small_int, min_size=1, max_size=4).map(tuple))


# derandomized: the same 150 examples in every run, so that CI does not fail on whichever
# case a random draw found first (a new case is a new test, written out below if needed)
@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(_CLASSES)),
       in_channels=st.integers(-1, 5), out_channels=st.integers(-1, 5),
       kernel_count=st.integers(-1, 4), groups=st.integers(-1, 4),
       dks=size_arg, stride=size_arg,
       padding=st.one_of(size_arg, st.sampled_from(['same', 'valid', 'bogus'])),
       padding_mode=st.sampled_from(['zeros', 'reflect', 'replicate', 'circular', 'x']),
       version=st.sampled_from(['v0', 'v1', 'max', 'gauss', 'bilinear', 'triangle', 'gaussian',
                                'spline']),
       batch=st.sampled_from([None, 1, 2]), channels=st.integers(0, 5),
       spatial=st.lists(st.integers(0, 9), min_size=0, max_size=4))
# an unbatched 4-D input of a 3-D layer (the shape the test once misread)
@example(name='Dcls3_1d', in_channels=1, out_channels=1, kernel_count=1, groups=1, dks=1,
         stride=1, padding=0, padding_mode='zeros', version='v0', batch=1, channels=2,
         spatial=[1, 1])
def test_fuzz_only_value_errors(name, in_channels, out_channels, kernel_count, groups, dks,
                                stride, padding, padding_mode, version, batch, channels,
                                spatial):
    cls, _ = _CLASSES[name]
    try:
        m = cls(in_channels, out_channels, kernel_count, stride=stride, padding=padding,
                dilated_kernel_size=dks, groups=groups, padding_mode=padding_mode,
                interpolation=version)
    except ValueError:
        return
    shape = ([batch] if batch else []) + [channels] + spatial
    x = torch.randn(shape, requires_grad=True)
    try:
        y = m(x)
    except ValueError:
        return
    # the layer reads the input by its own number of dims: a (1, 2, 1, 1) input of a 3-D
    # layer is one unbatched sample of 1 channel, whatever `batch` and `spatial` were
    assert y.shape[-m.conv_dims - 1] == m.out_channels
    y.sum().backward()
    assert x.grad.shape == x.shape
