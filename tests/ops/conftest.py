"""Fixtures shared by the operator tests."""
import pytest

from dcls_mm.ops import extension


@pytest.fixture(params=['compiled', 'torch'])
def route(request, monkeypatch):
    """Run the test once per triangle/gaussian construction: the compiled CPU op and
    the PyTorch ``einsum`` fallback (forced through ``DCLS_MM_ROUTES``)."""
    if request.param == 'compiled':
        assert extension.available(), 'the compiled CPU kernels are not built: run bash tools/env/setup.sh'
        monkeypatch.delenv('DCLS_MM_ROUTES', raising=False)
    else:
        monkeypatch.setenv('DCLS_MM_ROUTES', 'construct=torch')
    return request.param
