"""The compiled kernel-gradient op, the measured route that picks it, and the fallback."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dcls_mm.ops import extension
from dcls_mm.ops import depthwise as dw
from dcls_mm.ops import routes
from tests._helpers import ROOT



def dense_kernel_grad(x, g, kh, kw, pads, stride):
    """dL/dK[c, i, j] = sum_{n,y,x} g[n,c,y,x] * x_pad[n,c,s*y+i,s*x+j], tap by tap, float64."""
    (pt, pb), (pl, pr) = pads
    xp = F.pad(x.double(), (pl, pr, pt, pb))
    g = g.double()
    ho, wo = g.shape[-2:]
    out = torch.zeros(x.shape[1], 1, kh, kw, dtype=torch.float64)
    for i in range(kh):
        for j in range(kw):
            window = xp[:, :, i:i + stride[0] * (ho - 1) + 1:stride[0],
                        j:j + stride[1] * (wo - 1) + 1:stride[1]]
            out[:, 0, i, j] = (g * window).sum(dim=(0, 2, 3))
    return out


@pytest.fixture(scope='module')
def op():
    assert extension.available(), 'the compiled CPU kernels are not built: run bash tools/env/setup.sh'
    return torch.ops.dcls_mm.depthwise_kernel_grad


GEOMETRIES = [
    # (N, C, H, W), (kh, kw), ((top, bottom), (left, right)), stride
    ((2, 16, 9, 9), (5, 5), ((2, 2), (2, 2)), (1, 1)),      # one full channel block
    ((2, 37, 11, 10), (17, 13), ((8, 8), (6, 6)), (1, 1)),  # 2 blocks + a partial one
    ((1, 5, 7, 7), (13, 13), ((6, 6), (6, 6)), (1, 1)),     # partial block only, cropped
    ((3, 20, 10, 9), (5, 6), ((1, 3), (0, 2)), (2, 1)),     # asymmetric, mixed stride
    ((2, 18, 3, 4), (9, 9), ((4, 4), (4, 4)), (2, 2)),      # map smaller than the kernel
    ((1, 17, 6, 5), (3, 3), ((4, 4), (4, 4)), (1, 1)),      # rows that never meet the input
    ((2, 32, 12, 21), (7, 15), ((3, 3), (7, 7)), (1, 2)),   # tiles of 8 + 4 + 2 + 1 taps
    ((1, 16, 5, 30), (3, 9), ((1, 1), (0, 0)), (1, 3)),     # no padding, stride 3
]


@pytest.mark.parametrize('shape,k,pads,stride', GEOMETRIES)
def test_op_matches_dense_formula(op, shape, k, pads, stride):
    torch.manual_seed(0)
    (pt, pb), (pl, pr) = pads
    x = torch.randn(shape)
    ho = (shape[2] + pt + pb - k[0]) // stride[0] + 1
    wo = (shape[3] + pl + pr - k[1]) // stride[1] + 1
    g = torch.randn(shape[0], shape[1], ho, wo)
    want = dense_kernel_grad(x, g, *k, pads, stride)
    for layout in (torch.contiguous_format, torch.channels_last):
        got = op(x.contiguous(memory_format=layout), g.contiguous(memory_format=layout),
                 k[0], k[1], pt, pl, *stride)
        assert got.shape == (shape[1], 1, *k) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    for route in (dw._kernel_grad_fft, dw._kernel_grad_aten):  # the other devices' routes
        got = route(x, g, k, pads, stride)
        assert got.shape == (shape[1], 1, *k) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def test_op_rejects_bad_input(op):
    x = torch.randn(2, 4, 6, 6)
    with pytest.raises(RuntimeError, match='float32'):
        op(x.double(), x.double(), 3, 3, 1, 1, 1, 1)
    with pytest.raises(RuntimeError, match='differ in batch or channels'):
        op(x, torch.randn(2, 5, 6, 6), 3, 3, 1, 1, 1, 1)
    with pytest.raises(RuntimeError, match='stride must be positive'):
        op(x, x, 3, 3, 1, 1, 0, 1)
    with pytest.raises(RuntimeError, match=r'\(N, C, H, W\)'):
        op(x[0], x[0], 3, 3, 1, 1, 1, 1)


def test_op_result_does_not_depend_on_the_thread_count(op):
    """With few channel blocks the kernel rows are split over more work items when more
    threads run; every tap's sum is still computed whole by one item, in the same order."""
    torch.manual_seed(0)
    x, g = torch.randn(2, 32, 12, 12), torch.randn(2, 32, 12, 12)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 3, 8):  # 1, 3 and 8 groups of kernel rows for the 2 channel blocks
            torch.set_num_threads(n)
            results.append(op(x, g, 9, 9, 4, 4, 1, 1))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:])
    torch.testing.assert_close(results[0].double(),
                               dense_kernel_grad(x, g, 9, 9, ((4, 4), (4, 4)), (1, 1)),
                               rtol=1e-5, atol=1e-4)


def test_kernel_grad_routes_measured_once_and_both_exact(monkeypatch, tmp_path):
    """Both routes are exact; with nothing forced the route is measured on the first
    call of a shape, then reused (no second measurement) and written to the cache."""
    monkeypatch.delenv('DCLS_MM_ROUTES', raising=False)
    monkeypatch.setenv('DCLS_MM_ROUTE_CACHE', str(tmp_path / 'routes.json'))
    monkeypatch.setattr(routes, '_memory', {})
    monkeypatch.setattr(routes, '_loaded_from', {})
    monkeypatch.setattr(routes, '_decided', {})
    monkeypatch.setattr(routes, '_used', {})
    calls = []
    real_fft = dw._kernel_grad_fft
    monkeypatch.setattr(dw, '_kernel_grad_fft', lambda *a: calls.append('fft') or real_fft(*a))
    torch.manual_seed(0)
    x, g = torch.randn(1, 16, 7, 7), torch.randn(1, 16, 7, 7)
    pads = ((6, 6), (6, 6))
    want = dense_kernel_grad(x, g, 13, 13, pads, (1, 1))
    k13 = torch.randn(16, 1, 13, 13)  # only its shape matters without a support
    got = dw._kernel_grad(x, g, k13, pads, (1, 1))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    assert len(calls) == 1 + routes.TIMED_RUNS  # warm-up + timed runs of the FFT route
    route = dw.kernel_grad_route(x.shape, (13, 13), (1, 1), pads)
    assert route in ('direct', 'fft')
    # the report crops like depthwise_conv2d: a 17x17 kernel on a 7x7 map is this 13x13 one
    assert dw.kernel_grad_route(x.shape, (17, 17), (1, 1), ((8, 8), (8, 8))) == route
    assert dw.kernel_grad_route((2, 16, 7, 7), (17, 17), (1, 1), ((8, 8), (8, 8))) == (
        'not measured yet')
    dw._kernel_grad(x, g, k13, pads, (1, 1))
    assert len(calls) == 1 + routes.TIMED_RUNS + (route == 'fft')
    dw._kernel_grad(x.double(), g.double(), k13, pads, (1, 1))
    assert calls[-1] == 'fft'  # float64: no compiled kernel, nothing to measure
    for forced in ('direct', 'fft'):
        monkeypatch.setenv('DCLS_MM_ROUTES', f'kernel_grad={forced}')
        got = dw._kernel_grad(x, g, k13, pads, (1, 1))
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    assert calls[-1] == 'fft'


FALLBACK_SCRIPT = textwrap.dedent('''
    import logging, sys
    records = []
    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())
    logging.getLogger('dcls_mm').addHandler(Keep())
    logging.getLogger('dcls_mm').setLevel(logging.INFO)
    import torch
    from dcls_mm.ops import Dcls2d
    torch.manual_seed(0)
    m = Dcls2d(8, 8, 4, dilated_kernel_size=9, padding='same', groups=8)
    x = torch.randn(2, 8, 7, 7, requires_grad=True)
    grads = []
    for impl in ('auto', 'plain', 'auto'):
        m.impl = impl
        grads.append(torch.autograd.grad(m(x).square().sum(), [x, m.weight, m.P]))
    for a, b in zip(grads[0], grads[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    print(len(records))
    print(records[0] if records else '')
''')


def _run(script_or_args, ext_dir, **env):
    args = ([sys.executable, '-c', script_or_args] if isinstance(script_or_args, str)
            else [sys.executable] + script_or_args)
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'DCLS_MM_EXT_DIR': str(ext_dir), **env})


def test_missing_library_falls_back_with_one_log_line(tmp_path):
    proc = _run(FALLBACK_SCRIPT, tmp_path)
    assert proc.returncode == 0, proc.stderr
    count, message = proc.stdout.splitlines()
    assert count == '1'
    assert 'not built' in message and 'PyTorch fallback' in message
    assert 'bash tools/env/setup.sh' in message


def test_corrupt_library_falls_back_with_one_log_line(tmp_path):
    probe = _run('from dcls_mm.ops import extension; print(extension.library_path())', tmp_path)
    lib = Path(probe.stdout.strip())
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b'not a shared library')
    proc = _run(FALLBACK_SCRIPT, tmp_path)
    assert proc.returncode == 0, proc.stderr
    count, message = proc.stdout.splitlines()
    assert count == '1'
    assert 'could not load' in message and str(lib) in message


def test_build_without_compiler_reports_one_line(tmp_path):
    proc = _run(['tools/env/build_extension.py'], tmp_path, CXX=str(tmp_path / 'no-such-c++'))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in proc.stderr, proc.stderr
    assert 'could not compile the optional C++ kernels' in lines[0]
    assert 'PyTorch fallback' in lines[0]
    status = _run(['tools/env/build_extension.py', '--status'], tmp_path)
    assert status.returncode == 1 and 'not built' in status.stderr


def test_library_is_keyed_by_sources(tmp_path, monkeypatch):
    monkeypatch.setenv('DCLS_MM_EXT_DIR', str(tmp_path))
    before = extension.build_dir()
    assert before.parent == tmp_path
    edited = tmp_path / 'edited.cpp'
    edited.write_text(extension.SOURCES[0].read_text() + '\n// edited\n')
    monkeypatch.setattr(extension, 'SOURCES', (edited, ))
    assert extension.build_dir() != before  # a stale library is never picked up
