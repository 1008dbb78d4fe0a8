"""The Triton depthwise forward (GPU route ``conv=triton``), run by Triton's CPU
interpreter (``TRITON_INTERPRET=1``, in a subprocess) against a float64 formula, and its
place among the routes."""
import pytest
import torch

from dcls_mm.ops import depthwise as dw
from dcls_mm.ops import triton_conv
from tests._helpers import run_interpreted

pytestmark = pytest.mark.skipif(triton_conv.triton is None, reason='triton is not installed')


def test_kernel_matches_the_dense_formula():
    out = run_interpreted('''
        import torch, torch.nn.functional as F
        from dcls_mm.ops import triton_conv

        def formula(x, k, b, pads):
            """y[n,c,h,w] = b[c] + sum_ij k[c,i,j] x_pad[n,c,h+i,w+j], one tap at a time"""
            (pt, pb), (pl, pr) = pads
            xp = F.pad(x.double(), (pl, pr, pt, pb))  # negative pads crop
            kh, kw = k.shape[-2:]
            ho, wo = xp.shape[-2] - kh + 1, xp.shape[-1] - kw + 1
            y = b.double().view(1, -1, 1, 1).expand(x.shape[0], -1, ho, wo).clone()
            for i in range(kh):
                for j in range(kw):
                    y += k[:, 0, i, j].double().view(1, -1, 1, 1) * xp[:, :, i:i + ho, j:j + wo]
            return y

        torch.manual_seed(0)
        cases = [  # (N, C, H, W), (kh, kw), ((top, bottom), (left, right))
            ((2, 20, 9, 10), (5, 7), ((2, 2), (3, 3))),     # partial channel block
            ((1, 70, 5, 20), (9, 9), ((4, 4), (4, 4))),     # 2 channel blocks, 2 column strips
            ((2, 16, 7, 7), (3, 5), ((0, 3), (2, -1))),     # asymmetric and negative padding
            ((1, 16, 3, 4), (9, 9), ((4, 4), (4, 4))),      # map smaller than the kernel
        ]
        for shape, k_hw, pads in cases:
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(shape).to(dtype)
                k = torch.randn(shape[1], 1, *k_hw)
                # without a bias in float32, with one in bfloat16 (the interpreter is slow)
                for bias in [None] if dtype == torch.float32 else [torch.randn(shape[1])]:
                    y = triton_conv.depthwise_conv(x, k, bias, pads)
                    zero = torch.zeros(shape[1])
                    # the kernel and bias are used in x's dtype, as F.conv2d uses them
                    want = formula(x, k.to(dtype), (zero if bias is None else bias).to(dtype), pads)
                    assert y.shape == want.shape and y.dtype == dtype, (y.shape, want.shape)
                    assert y.is_contiguous(memory_format=torch.channels_last)
                    if dtype == torch.float32:
                        torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
                    else:  # one rounding of a float32 sum to bfloat16: within one bf16 ulp
                        ulp = 2.0 ** (torch.floor(torch.log2(want.abs().clamp_min(1e-30))) - 7)
                        assert ((y.double() - want).abs() <= ulp).all()
        print('ok', len(cases))
    ''')
    assert out.split() == ['ok', '4']


def test_dcls_layer_through_the_triton_route_equals_the_plain_path():
    """Forward and the stride-1 input gradient (a forward with the flipped kernel) run the
    Triton kernel; every gradient equals the plain path's."""
    out = run_interpreted('''
        import copy, os, torch
        from dcls_mm.ops import Dcls2d, routes
        os.environ['DCLS_MM_ROUTES'] = 'conv=triton'
        torch.manual_seed(0)
        layer = Dcls2d(24, 24, 5, padding='same', dilated_kernel_size=9, groups=24,
                       interpolation='gaussian')
        plain = copy.deepcopy(layer)
        plain.impl = 'plain'
        x = torch.randn(2, 24, 10, 11)
        grad = torch.randn(2, 24, 10, 11)
        outs = []
        for m in (layer, plain):
            xi = x.clone().requires_grad_(True)
            y = m(xi)
            y.backward(grad)
            outs.append([y, xi.grad] + [p.grad for p in m.parameters()])
        for a, b in zip(*outs):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        print(sorted(route for key, route in routes.decisions().items() if key.startswith('conv')))
    ''')
    assert "['triton (forced)']" in out  # one shape: the forward's and the input gradient's


def test_not_a_cpu_route_without_the_interpreter(monkeypatch):
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    pads = ((2, 2), (2, 2))
    assert dw._conv_routes(32, (1, 1), pads, torch.float32, torch.device('cpu'))[0] == 'onednn'
    assert 'triton' not in dw._conv_routes(32, (1, 1), pads, torch.float32, torch.device('cpu'))
    monkeypatch.setenv('TRITON_INTERPRET', '1')
    assert dw._conv_routes(32, (1, 1), pads, torch.bfloat16, torch.device('cpu')) == (
        'onednn', 'triton')
    assert dw._conv_routes(32, (2, 2), pads, torch.float32, torch.device('cpu'))[-1] != 'triton'


def test_not_offered_on_gpus_triton_cannot_compile_for(monkeypatch):
    """Triton needs compute capability 7.0: an older NVIDIA GPU keeps PyTorch's routes."""
    gpu = torch.device('cuda', 0)
    triton_conv._gpu_supported.cache_clear()
    monkeypatch.setattr(torch.version, 'hip', None)
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: (6, 1))
    assert not triton_conv.available(gpu, torch.float32)
    assert dw._conv_routes(32, (1, 1), ((2, 2), (2, 2)), torch.float32, gpu) == ('aten',)
    triton_conv._gpu_supported.cache_clear()
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: (9, 0))
    assert triton_conv.available(gpu, torch.bfloat16)
    assert not triton_conv.available(gpu, torch.float64)
    assert dw._conv_routes(32, (1, 1), ((2, 2), (2, 2)), torch.float32, gpu) == ('aten', 'triton')
    triton_conv._gpu_supported.cache_clear()


def test_every_autotune_config_and_float16():
    """The interpreter cannot time kernels, so the route runs the first config; a GPU may
    pick any of them: each block shape, launched directly, against the float64 formula
    (partial strips and channel blocks in both dims), in float32 and float16."""
    out = run_interpreted('''
        import torch, torch.nn.functional as F
        import triton
        from dcls_mm.ops import triton_conv

        torch.manual_seed(0)
        n, c, h, w, kh, kw, pt, pl = 1, 40, 3, 9, 3, 5, 1, 2
        ho, wo = h, w
        x = torch.randn(n, c, h, w)
        k = torch.randn(c, 1, kh, kw)
        want = F.conv2d(F.pad(x.double(), (pl, pl, pt, pt)), k.double(), groups=c)
        for dtype in (torch.float32, torch.float16):
            xd = x.to(dtype).contiguous(memory_format=torch.channels_last)
            taps = k.to(dtype).reshape(c, kh, kw).permute(1, 2, 0).contiguous()
            ref = F.conv2d(F.pad(xd.double(), (pl, pl, pt, pt)), k.to(dtype).double(), groups=c)
            for cfg in triton_conv._CONFIGS:
                bw, bc = cfg.kwargs['BLOCK_W'], cfg.kwargs['BLOCK_C']
                y = torch.empty((n, c, ho, wo), dtype=dtype, memory_format=torch.channels_last)
                grid = (n * ho * triton.cdiv(wo, bw), triton.cdiv(c, bc))
                triton_conv._depthwise_forward.fn[grid](xd, taps, taps, y, h, w, c, ho, wo, kh,
                                                        kw, pt, pl, HAS_BIAS=False,
                                                        BLOCK_W=bw, BLOCK_C=bc)
                if dtype == torch.float32:
                    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
                else:  # float32 sums rounded once to float16: within one float16 ulp
                    ulp = 2.0 ** (torch.floor(torch.log2(ref.abs().clamp_min(1e-4))) - 10)
                    assert ((y.double() - ref).abs() <= ulp).all(), (bw, bc)
        print('ok', len(triton_conv._CONFIGS))
    ''')
    assert out.split() == ['ok', '6']
