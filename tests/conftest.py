"""Suite-wide fixtures."""
import pytest


@pytest.fixture(autouse=True)
def _restore_default_scope():
    """MMEngine's default scope is process-global (the last DefaultScope created wins):
    a test that builds an mmseg config must not change how the next test's registry
    lookups resolve."""
    from mmengine.registry import DefaultScope
    saved = list(DefaultScope._instance_dict.items())
    yield
    DefaultScope._instance_dict.clear()
    DefaultScope._instance_dict.update(saved)
