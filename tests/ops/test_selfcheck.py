"""The device self-check: passes on a correct device, names the tensor that is wrong."""
import torch

from dcls_mm.ops import depthwise as dw
from dcls_mm.ops.selfcheck import TOLERANCE, check_device
from tests._helpers import load_tool

tool = load_tool('tools/analysis/check_device.py')


def test_cpu_passes_every_comparison():
    records = check_device('cpu', interpolations=['bilinear', 'gaussian'])
    # 2 strides x (the fast path with measured routes and each of the 8 forced, the fast
    # path with initial positions, plain, grouped) x 2 dtypes x (output + gradients of
    # input, weight, P, bias; gaussian also SIG)
    assert len(records) == 2 * (9 + 1 + 1 + 1) * 2 * (5 + 6)
    assert all(r['ok'] for r in records), [r for r in records if not r['ok']]
    assert {r['routes'] for r in records if r['path'] == 'depthwise'} == {
        'measured', 'conv=onednn', 'conv=direct', 'conv=sparse', 'kernel_grad=direct',
        'kernel_grad=fft', 'kernel_grad=sparse',
        'construct=compiled', 'construct=torch'}
    assert {r['routes'] for r in records if r['path'] != 'depthwise'} == {'measured'}
    assert {r['fast_path'] for r in records if r['path'] in ('depthwise', 'centred')} == {True}
    assert {r['fast_path'] for r in records if r['path'] in ('plain', 'grouped')} == {False}
    # the 'centred' layers really run cropped on the CPU
    from dcls_mm.ops.selfcheck import _layer
    layer = _layer('bilinear', 32, 32, 1, spread=False)
    assert layer.kernel_window(torch.empty(2, 32, 15, 14)) is not None


def test_a_wrong_fast_path_output_is_reported(monkeypatch, capsys):
    real = dw._conv

    def off_by_a_little(x, kernel, *args):
        y = real(x, kernel, *args)
        return y + 10 * TOLERANCE[torch.bfloat16] * y.abs().max()

    monkeypatch.setattr(dw, '_conv', off_by_a_little)
    records = check_device('cpu', interpolations=['triangle'])
    failed = {(r['path'], r['tensor']) for r in records if not r['ok']}
    # the forward of the fast path is wrong (its stride-1 input gradient runs _conv too);
    # the plain and grouped paths never call it
    assert ('depthwise', 'output') in failed
    assert ('centred', 'output') in failed
    assert all(path in ('depthwise', 'centred') for path, _ in failed)
    assert tool.main(['--device', 'cpu']) == 1
    printed = capsys.readouterr().out
    assert 'FAIL triangle stride 1 depthwise (measured routes) float32 output' in printed
    assert 'FAIL triangle stride 1 depthwise (conv=direct routes) float32 output' in printed
