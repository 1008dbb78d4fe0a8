"""Measured per-shape routes (dcls_mm.ops.routes): choice, disk cache, forcing."""
import json
import time

import pytest
import torch

from dcls_mm.ops import routes


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty in-process memory and a cache file of our own."""
    path = tmp_path / 'routes.json'
    monkeypatch.delenv('DCLS_MM_ROUTES', raising=False)
    monkeypatch.setenv('DCLS_MM_ROUTE_CACHE', str(path))
    monkeypatch.setattr(routes, '_memory', {})
    monkeypatch.setattr(routes, '_loaded_from', {})
    monkeypatch.setattr(routes, '_decided', {})
    monkeypatch.setattr(routes, '_used', {})
    monkeypatch.setattr(routes, '_unavailable_warned', set())
    return path


def _candidates(calls, slow='slow'):
    def make(name, seconds):
        def fn():
            calls.append(name)
            time.sleep(seconds)
            return name
        return fn
    return {'fast': make('fast', 0.0), slow: make(slow, 0.02)}


def test_fastest_route_is_measured_once_and_kept_on_disk(fresh, monkeypatch):
    calls = []
    assert routes.run('op', 'shape A', _candidates(calls)) == 'fast'
    assert sorted(set(calls)) == ['fast', 'slow']
    assert calls.count('slow') == 1 + routes.TIMED_RUNS
    calls.clear()
    assert routes.run('op', 'shape A', _candidates(calls)) == 'fast'
    assert calls == ['fast']  # no second measurement
    assert routes.chosen('op', 'shape A') == 'fast'
    data = json.loads(fresh.read_text())
    (machine, entries), = data.items()
    assert machine == routes.machine_key()
    assert torch.backends.cpu.get_cpu_capability() in machine and torch.__version__ in machine
    assert entries['op shape A']['route'] == 'fast'
    assert entries['op shape A']['seconds']['slow'] >= 0.02
    # a new process (empty memory) reads the decision instead of measuring
    monkeypatch.setattr(routes, '_memory', {})
    monkeypatch.setattr(routes, '_loaded_from', {})
    monkeypatch.setattr(routes, '_decided', {})
    calls.clear()
    assert routes.chosen('op', 'shape B') is None
    assert routes.run('op', 'shape A', _candidates(calls)) == 'fast'
    assert calls == ['fast']
    assert routes.decisions() == {'op shape A': 'fast'}
    # another shape is measured on its own, and both are kept in the file
    routes.run('op', 'shape B', _candidates(calls))
    assert set(json.loads(fresh.read_text())[machine]) == {'op shape A', 'op shape B'}


def test_cache_of_another_machine_is_not_used(fresh):
    fresh.write_text(json.dumps({'some other CPU | torch 0': {'op shape A': {'route': 'slow'}}}))
    calls = []
    assert routes.run('op', 'shape A', _candidates(calls)) == 'fast'
    assert 'slow' in calls  # measured here, not taken from the other machine's entry
    data = json.loads(fresh.read_text())
    assert data['some other CPU | torch 0'] == {'op shape A': {'route': 'slow'}}


@pytest.mark.parametrize('content', ['{not json', '[1, 2]', '{"m": {"k": {"no_route": 1}}}',
                                     '[' * 100000 + ']' * 100000])  # RecursionError
def test_corrupt_cache_is_ignored_with_one_warning(fresh, content):
    fresh.write_text(content)
    calls = []
    with pytest.warns(RuntimeWarning, match='ignoring the unreadable route cache') as record:
        assert routes.run('op', 'shape A', _candidates(calls)) == 'fast'
    assert len([r for r in record if 'route cache' in str(r.message)]) == 1
    assert str(fresh) in str(record[0].message)
    # rewritten as a valid file holding the new decision
    assert json.loads(fresh.read_text())[routes.machine_key()]['op shape A']['route'] == 'fast'


def test_forced_route_and_disabled_cache(fresh, monkeypatch):
    calls = []
    monkeypatch.setenv('DCLS_MM_ROUTES', 'other=x, op=slow')
    assert routes.run('op', 'shape A', _candidates(calls)) == 'slow'
    assert calls == ['slow'] and not fresh.exists()
    assert routes.chosen('op', 'shape A') == 'slow (forced)'
    # a forced route that is not available for this call: measured among the others
    monkeypatch.setenv('DCLS_MM_ROUTES', 'op=gpu_only')
    monkeypatch.setenv('DCLS_MM_ROUTE_CACHE', '0')
    assert routes.cache_path() is None
    with pytest.warns(RuntimeWarning, match='forces op=gpu_only, which is not available'):
        assert routes.run('op', 'shape A', _candidates(calls)) == 'fast'
    assert not fresh.exists()
    # malformed items raise whichever op is asked for, also after the one asked for
    for spec in ('op', 'op=slow,kernel_grad', 'op=slow,', 'other=x,=y'):
        monkeypatch.setenv('DCLS_MM_ROUTES', spec)
        with pytest.raises(ValueError, match='DCLS_MM_ROUTES must look like'):
            routes.run('op', 'shape A', _candidates(calls))


def _write_entries(name, count):
    for i in range(count):
        routes._write(routes.cache_path(), 'machine', f'{name} {i}', {'route': 'fast'})


def test_processes_writing_at_once_keep_every_entry(fresh):
    """Each process reads, merges and renames the cache file: without a lock between
    processes the last rename dropped the other's new entries."""
    import multiprocessing
    context = multiprocessing.get_context('fork')
    workers = [context.Process(target=_write_entries, args=(name, 100)) for name in 'AB']
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    assert len(json.loads(fresh.read_text())['machine']) == 200


def test_single_candidate_is_not_measured(fresh):
    calls = []
    only = {'fast': _candidates(calls)['fast']}
    assert routes.run('op', 'shape A', only) == 'fast'
    assert calls == ['fast'] and not fresh.exists()
    assert routes.chosen('op', 'shape A') == 'fast (only one available)'


def test_later_calls_skip_the_lookup_but_not_a_forced_route(fresh, monkeypatch):
    """Once decided, a shape's route is taken without the machine key (which reads
    /proc/cpuinfo, or the GPU's properties) or the cache file: this runs on every layer
    call. Forcing still wins, and a decision for one device is not taken for another."""
    calls = []
    assert routes.run('op', 'shape A', _candidates(calls), torch.device('cpu')) == 'fast'

    def no_lookup(*args):
        raise AssertionError('machine key computed again')
    monkeypatch.setattr(routes, 'machine_key', no_lookup)
    calls.clear()
    assert routes.run('op', 'shape A', _candidates(calls), torch.device('cpu')) == 'fast'
    assert calls == ['fast']
    monkeypatch.setenv('DCLS_MM_ROUTES', 'op=slow')
    assert routes.run('op', 'shape A', _candidates(calls), torch.device('cpu')) == 'slow'
    monkeypatch.delenv('DCLS_MM_ROUTES')
    with pytest.raises(AssertionError, match='machine key computed again'):
        routes.run('op', 'shape A', _candidates(calls), torch.device('meta'))


def test_reports_are_kept_per_device(fresh, monkeypatch):
    """The same op and shape on two devices (the CPU and a GPU in one process) are two
    decisions: the report for one never shows the other's route."""
    monkeypatch.setattr(routes, 'machine_key', lambda device=None: f'machine {device}')
    calls = []
    other = torch.device('meta')  # stands for a GPU: only its name keys the choice here
    assert routes.run('op', 'shape A', _candidates(calls)) == 'fast'
    assert routes.chosen('op', 'shape A', other) is None
    monkeypatch.setenv('DCLS_MM_ROUTES', 'op=slow')
    assert routes.run('op', 'shape A', _candidates(calls), other) == 'slow'
    assert routes.chosen('op', 'shape A', other) == 'slow (forced)'
    assert routes.chosen('op', 'shape A') == 'fast'
    assert routes.decisions() == {'op shape A': 'fast'}
    assert routes.decisions(other) == {'op shape A': 'slow (forced)'}


def test_choose_names_the_route_that_computed_the_result(fresh, monkeypatch):
    calls = []
    # measured: the name of the fastest candidate (whose result each candidate returns)
    assert routes.choose('op', 'shape C', _candidates(calls, slow='other')) == ('fast', 'fast')
    calls.clear()
    assert routes.choose('op', 'shape C', _candidates(calls, slow='other')) == ('fast', 'fast')
    assert calls == ['fast']
    # forced, and the only candidate
    monkeypatch.setenv('DCLS_MM_ROUTES', 'op=other')
    assert routes.choose('op', 'shape C', _candidates(calls, slow='other')) == ('other', 'other')
    monkeypatch.delenv('DCLS_MM_ROUTES')
    only = {'other': _candidates(calls, slow='other')['other']}
    assert routes.choose('op', 'shape D', only) == ('other', 'other')
    assert routes.chosen('op', 'shape D') == 'other (only one available)'
