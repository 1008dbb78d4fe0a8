"""dcls_mm.engine.runner_utils.build_runner: the config's runner_type."""
import pytest
from mmengine.config import Config

from dcls_mm.engine.runner_utils import build_runner


def test_unknown_runner_type_is_named():
    cfg = Config(dict(runner_type='NoSuchRunner', work_dir='unused'))
    with pytest.raises(KeyError, match="runner_type 'NoSuchRunner' is not in the RUNNERS"):
        build_runner(cfg)
