"""Suite-wide fixtures: process-global mmengine state is restored after each test."""
import logging
from collections import OrderedDict

import pytest


def _default_scope_restored():
    """MMEngine's default scope is process-global (the last DefaultScope created wins):
    a test that builds an mmseg config must not change how the next test's registry
    lookups resolve."""
    from mmengine.registry import DefaultScope
    saved = list(DefaultScope._instance_dict.items())
    yield
    DefaultScope._instance_dict.clear()
    DefaultScope._instance_dict.update(saved)


#: per test, and per module: module-scoped fixtures (data, checkpoints built from a
#: config) run before any test's snapshot and would otherwise leak their scope
_restore_default_scope = pytest.fixture(autouse=True)(_default_scope_restored)
_restore_default_scope_per_module = pytest.fixture(autouse=True, scope='module')(
    _default_scope_restored)


@pytest.fixture(autouse=True)
def _restore_checkpoint_schemes():
    """``CheckpointLoader._schemes`` (prefix -> loader) is class-global: a test that
    registers a loader must not change how later tests read checkpoints. The baseline
    is the state after ``import dcls_mm.engine``, which registers the checked local
    loader once per process (restoring a pre-import snapshot would drop it for good)."""
    import dcls_mm.engine  # noqa: F401
    from mmengine.runner.checkpoint import CheckpointLoader
    saved = list(CheckpointLoader._schemes.items())
    yield
    CheckpointLoader._schemes = OrderedDict(saved)


@pytest.fixture(autouse=True)
def _close_new_loggers():
    """``Runner.from_cfg`` creates an MMLogger (kept in ``MMLogger._instance_dict`` for the
    whole process) with a FileHandler open on ``<work_dir>/<timestamp>/<timestamp>.log``
    in the test's tmp folder. Close the file handlers of the loggers a test created and
    forget those loggers, so that files are not left open across the session."""
    from mmengine.logging import MMLogger
    before = set(MMLogger._instance_dict)
    yield
    for name in [n for n in MMLogger._instance_dict if n not in before]:
        logger = MMLogger._instance_dict.pop(name)
        for handler in list(logger.handlers):
            if isinstance(handler, logging.FileHandler):
                logger.removeHandler(handler)
                handler.close()


def _one_thread():
    """torch on one thread for the test: on small tensors OpenMP's start-up dominates,
    and on a busy shared 2-core machine two threads are slower than one."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


one_thread = pytest.fixture(_one_thread, name='one_thread')
#: the same for a whole module, its module-scoped fixtures included (request it with
#: ``pytestmark = pytest.mark.usefixtures('one_thread_module')``)
one_thread_module = pytest.fixture(_one_thread, scope='module', name='one_thread_module')


@pytest.fixture(autouse=True, scope='session')
def _route_cache_in_tmp(tmp_path_factory):
    """The fast path measures its routes once per shape and keeps them in
    ``~/.cache/dcls-mm/routes.json``: the suite (and the tools it runs in subprocesses,
    which inherit the environment) writes its own file instead of the user's, so tiny
    test shapes measured on a busy CI machine never steer a user's later runs."""
    import os
    if 'DCLS_MM_ROUTE_CACHE' in os.environ:
        yield
        return
    os.environ['DCLS_MM_ROUTE_CACHE'] = str(tmp_path_factory.mktemp('routes') / 'routes.json')
    try:
        yield
    finally:
        os.environ.pop('DCLS_MM_ROUTE_CACHE', None)
