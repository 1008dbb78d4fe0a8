"""Without autograd the constructed kernel is reused until a parameter changes."""
import copy

import torch

from dcls_mm.ops import Dcls1d, Dcls2d, Dcls2dK1d, set_impl


def test_kernel_reused_without_grad_and_rebuilt_after_any_change(monkeypatch):
    from dcls_mm.ops import modules
    builds = []
    build = modules.construct_kernel
    monkeypatch.setattr(modules, 'construct_kernel',
                        lambda *args: builds.append(1) or build(*args))
    m = Dcls2d(4, 4, 3, dilated_kernel_size=7, groups=4, padding='same', interpolation='gauss')
    with torch.no_grad():
        k1 = m.construct_kernel()
        assert torch.equal(m.construct_kernel(), k1) and len(builds) == 1
        m.P[0].add_(0.25)                      # in-place update (optimizer step)
        k2 = m.construct_kernel()
        assert len(builds) == 2 and not torch.equal(k2, k1)
        m.SIG.mul_(2)
        k3 = m.construct_kernel()
        assert not torch.equal(k3, k2)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    state['weight'] += 1
    m.load_state_dict(state)
    with torch.inference_mode():
        k4 = m.construct_kernel()
    expected = Dcls2d(4, 4, 3, dilated_kernel_size=7, groups=4, padding='same', interpolation='gauss')
    expected.load_state_dict(state)
    torch.testing.assert_close(k4, expected.construct_kernel().detach())
    # with autograd the kernel is always rebuilt (and differentiable)
    k5 = m.construct_kernel()
    assert k5.requires_grad
    # a moved/cast module never reuses the old kernel
    m64 = copy.deepcopy(m).double()
    with torch.no_grad():
        assert m64.construct_kernel().dtype == torch.float64


def _reference(m, x):
    """The layer's output by F.conv2d with its whole kernel built afresh (with autograd:
    no memo)."""
    with torch.enable_grad():
        kernel = m.construct_kernel().detach()
    return torch.nn.functional.conv2d(x, kernel, m.bias, padding=m.padding[0][0], groups=m.groups)


def test_forward_reads_the_positions_once_per_input_shape(monkeypatch):
    torch.manual_seed(0)
    m = Dcls2d(16, 16, 6, padding=8, dilated_kernel_size=17, groups=16,
               interpolation='gaussian').eval()
    with torch.no_grad():
        m.P.mul_(0.1)  # near the centre: the forward crops the kernel to a few taps
    calls = []
    window = Dcls2d.kernel_window
    monkeypatch.setattr(Dcls2d, 'kernel_window',
                        lambda self, x: calls.append(tuple(x.shape)) or window(self, x))
    small, large = torch.randn(2, 16, 5, 5), torch.randn(1, 16, 20, 20)
    with torch.no_grad():
        for x in (small, small, large, small, large):
            torch.testing.assert_close(m(x), _reference(m, x), rtol=1e-5, atol=1e-6)
        assert m.kernel_window(large) is not None
    assert calls == [small.shape, large.shape, large.shape]  # once per input shape
    calls.clear()
    # spread through .data (no version bump): the old window would drop taps
    m.P.data.uniform_(-8, 8)
    with torch.no_grad():
        assert window(m, large) is None
        torch.testing.assert_close(m(large), _reference(m, large), rtol=1e-5, atol=1e-6)
    assert calls == [large.shape]


def test_forward_memo_follows_set_impl():
    torch.manual_seed(0)
    m = Dcls2d(16, 16, 6, padding=8, dilated_kernel_size=17, groups=16,
               interpolation='bilinear').eval()
    x = torch.randn(1, 16, 6, 6)  # smaller than the kernel: the fast path crops
    with torch.no_grad():
        assert m.kernel_window(x) is not None
        for impl in ('auto', 'plain', 'auto'):
            set_impl(m, impl)
            torch.testing.assert_close(m(x), _reference(m, x), rtol=1e-5, atol=1e-6)


def test_forward_memo_stays_bounded_over_many_input_sizes():
    from dcls_mm.ops import modules
    m = Dcls2d(16, 16, 6, padding=8, dilated_kernel_size=17, groups=16).eval()
    with torch.no_grad():
        for size in range(4, 4 + modules._FORWARD_PLANS + 10):
            x = torch.randn(1, 16, size, 5)
            torch.testing.assert_close(m(x), _reference(m, x), rtol=1e-5, atol=1e-6)
        memo = m._inference_memo()
    assert 0 < len(memo.forward) <= modules._FORWARD_PLANS


def test_forward_plan_reads_the_bias_and_follows_forced_routes(monkeypatch):
    from dcls_mm.ops import extension, routes
    torch.manual_seed(0)
    m = Dcls2d(16, 16, 6, padding=8, dilated_kernel_size=17, groups=16).eval()
    with torch.no_grad():
        m.P.uniform_(-8, 8)
    x = torch.randn(2, 16, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(m(x), _reference(m, x), rtol=1e-5, atol=1e-6)
        m.bias.add_(1.)  # the bias is not among the memo's values
        torch.testing.assert_close(m(x), _reference(m, x), rtol=1e-5, atol=1e-6)
        copied = copy.deepcopy(m)  # with its own bias (and no memo: see the pickle test)
        copied.bias.data.mul_(-3.)
        torch.testing.assert_close(copied(x), _reference(copied, x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m(x), _reference(m, x), rtol=1e-5, atol=1e-6)
    names = ['onednn'] + (['direct', 'sparse'] if extension.available() else [])
    for name in names:
        monkeypatch.setattr(routes, '_used', {})
        monkeypatch.setenv(routes.ENV_FORCE, f'conv={name}')
        with torch.no_grad():
            torch.testing.assert_close(m(x), _reference(m, x), rtol=1e-5, atol=1e-6)
        assert f'{name} (forced)' in routes._used.values()


def test_module_pickles_and_copies_after_inference(tmp_path):
    """The memo (its plans are local functions) is left out of pickles and copies: after
    an inference call torch.save of the whole module failed with "Can't pickle local
    object"."""
    import pickle
    torch.manual_seed(0)
    m = Dcls2d(16, 16, 6, padding=8, dilated_kernel_size=17, groups=16,
               interpolation='bilinear').eval()
    with torch.no_grad():
        m.P.uniform_(-8, 8)
    x = torch.randn(2, 16, 12, 12)
    with torch.no_grad():
        y = m(x)
    assert '_inference_memo_' in m.__dict__
    path = tmp_path / 'layer.pt'
    torch.save(m, path)
    for clone in (torch.load(path, weights_only=False), pickle.loads(pickle.dumps(m)),
                  copy.deepcopy(m)):
        assert '_inference_memo_' not in clone.__dict__
        with torch.no_grad():
            torch.testing.assert_close(clone(x), y, rtol=0, atol=0)
            clone.bias.add_(1.)
            torch.testing.assert_close(clone(x), _reference(clone, x), rtol=1e-5, atol=1e-6)
    # the original keeps its memo, and its output
    assert '_inference_memo_' in m.__dict__
    with torch.no_grad():
        torch.testing.assert_close(m(x), y, rtol=0, atol=0)


def _no_memo(m, x):
    """The layer's output with autograd, which bypasses the memo."""
    with torch.enable_grad():
        return m(x).detach()


def test_memo_follows_the_interpolation():
    """A new interpolation (or the reference package's `version` name for it) after an
    inference call: the memo's kernel was the old one's."""
    torch.manual_seed(0)
    for m, x in ((Dcls2d(8, 8, 4, padding=3, dilated_kernel_size=7, groups=8),
                  torch.randn(1, 8, 9, 9)),
                 (Dcls1d(4, 6, 3, padding=3, dilated_kernel_size=7), torch.randn(2, 4, 11))):
        with torch.no_grad():
            m.SIG.fill_(0.6)
            before = m(x)
        m.version = 'max'  # = interpolation 'triangle'
        with torch.no_grad():
            after = m(x)
        torch.testing.assert_close(after, _no_memo(m, x), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(after, before)


def test_construct_kernel_without_grad_returns_a_copy():
    """Changing the kernel construct_kernel returned must not change later outputs."""
    torch.manual_seed(0)
    for m in (Dcls2d(16, 16, 6, padding=8, dilated_kernel_size=17, groups=16),
              Dcls2d(4, 8, 3, padding=3, dilated_kernel_size=7),
              Dcls2dK1d(4, 4, 3, padding=(3, 0), dilated_kernel_size=7)):
        x = torch.randn(2, m.in_channels, 12, 12)
        with torch.no_grad():
            y = m(x)
            m.construct_kernel().zero_()
            torch.testing.assert_close(m(x), y, rtol=0, atol=0)
        torch.testing.assert_close(y, _no_memo(m, x), rtol=1e-5, atol=1e-6)


def test_construct_kernel_takes_a_window_of_lists_without_grad():
    m = Dcls2d(4, 4, 3, padding=3, dilated_kernel_size=7, groups=4)
    expected = m.construct_kernel(((1, 6), (2, 5))).detach()
    with torch.no_grad():
        torch.testing.assert_close(m.construct_kernel([[1, 6], [2, 5]]), expected)


def test_forward_plan_follows_the_bias_dtype():
    """A bias replaced by one of another dtype after the plan was made (the compiled
    routes take float32 only: the plan made with a float32 bias must not be reused)."""
    torch.manual_seed(0)
    m = Dcls2d(16, 16, 6, padding=8, dilated_kernel_size=17, groups=16)
    x = torch.randn(2, 16, 12, 12)
    with torch.no_grad():
        m(x)
    m.bias = torch.nn.Parameter(m.bias.detach().bfloat16())
    with torch.no_grad():
        y = m(x)
    torch.testing.assert_close(y, _no_memo(m, x), rtol=1e-5, atol=1e-6)
