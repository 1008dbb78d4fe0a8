"""Without autograd the constructed kernel is reused until a parameter changes."""
import copy

import torch

from dcls_mm.ops import Dcls2d


def test_kernel_reused_without_grad_and_rebuilt_after_any_change():
    m = Dcls2d(4, 4, 3, dilated_kernel_size=7, groups=4, padding='same', interpolation='gauss')
    with torch.no_grad():
        k1 = m.construct_kernel()
        assert m.construct_kernel() is k1
        m.P[0].add_(0.25)                      # in-place update (optimizer step)
        k2 = m.construct_kernel()
        assert k2 is not k1 and not torch.equal(k2, k1)
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
