"""Resumable set records: durable appends, torn tails, fingerprint refusal, atomic files."""
import csv
import json

import pytest

from dcls_mm.evaluation.records import (FingerprintMismatch, SetRecords, file_digest,
                                        write_csv_atomic, write_json_atomic)

FP = {'model': 'convnext_dcls_tiny', 'checkpoint': 'abc', 'size': (224, 224)}


def test_records_survive_a_restart_and_skip_done_sets(tmp_path):
    path = tmp_path / 'out' / 'records.jsonl'
    rec = SetRecords(str(path), FP)
    rec.add('gaussian_noise/1', {'correct': 7, 'total': 10})
    rec.add('gaussian_noise/2', {'correct': 5, 'total': 10})
    again = SetRecords(str(path), dict(FP))  # tuple vs list: same fingerprint after JSON
    assert len(again) == 2 and 'gaussian_noise/1' in again and 'shot_noise/1' not in again
    assert again.get('gaussian_noise/2') == {'correct': 5, 'total': 10}
    assert [k for k, _ in again.items()] == ['gaussian_noise/1', 'gaussian_noise/2']
    with pytest.raises(KeyError, match='already recorded'):
        again.add('gaussian_noise/1', {'correct': 0, 'total': 10})


def test_a_torn_last_line_is_dropped_and_appends_continue(tmp_path):
    path = tmp_path / 'records.jsonl'
    rec = SetRecords(str(path), FP)
    rec.add('a', {'n': 1})
    with open(path, 'a') as f:  # a kill in the middle of a write
        f.write('{"key": "b", "rec')
    again = SetRecords(str(path), FP)
    assert [k for k, _ in again.items()] == ['a']
    again.add('c', {'n': 3})
    lines = path.read_text().splitlines()
    assert [json.loads(line).get('key') for line in lines[1:]] == ['a', 'c']
    assert [k for k, _ in SetRecords(str(path), FP).items()] == ['a', 'c']


@pytest.mark.parametrize('tail', ['', '\n'])
def test_a_last_record_without_its_newline_is_kept(tmp_path, tail):
    """A kill between a record and its newline: the record is whole and must stay, and
    the next append must start a line of its own (it once joined the record, and both
    were lost at the next start). A blank line in between is passed over."""
    path = tmp_path / 'records.jsonl'
    rec = SetRecords(str(path), FP)
    rec.add('a', {'n': 1})
    with open(path, 'a') as f:
        f.write(tail + json.dumps({'key': 'b', 'record': {'n': 2}}))
    again = SetRecords(str(path), FP)
    assert [k for k, _ in again.items()] == ['a', 'b']
    again.add('c', {'n': 3})
    assert [k for k, _ in SetRecords(str(path), FP).items()] == ['a', 'b', 'c']
    assert [k for k, _ in SetRecords(str(path), FP).items()] == ['a', 'b', 'c']  # stable
    assert path.read_text().endswith('\n') and '\0' not in path.read_text()


def test_another_run_configuration_is_refused_naming_the_change(tmp_path):
    path = tmp_path / 'records.jsonl'
    SetRecords(str(path), FP).add('a', {'n': 1})
    with pytest.raises(FingerprintMismatch, match=r"checkpoint: 'abc' -> 'xyz'") as info:
        SetRecords(str(path), {**FP, 'checkpoint': 'xyz'})
    assert 'model' not in str(info.value).split('changed:')[1]
    path.write_text('not json\n')
    with pytest.raises(FingerprintMismatch, match='not a dcls-mm records header'):
        SetRecords(str(path), FP)


def test_atomic_json_csv_and_digest(tmp_path):
    out = tmp_path / 'sub' / 'results.json'
    write_json_atomic(str(out), {'mCE': 53.2, 'errors': {'fog': {'1': 30.0}}})
    assert json.loads(out.read_text()) == {'mCE': 53.2, 'errors': {'fog': {'1': 30.0}}}
    assert [p.name for p in out.parent.iterdir()] == ['results.json']  # no temp left
    rows = [{'corruption': 'fog', 'severity': 1, 'top1': 70.0},
            {'corruption': 'snow', 'severity': 2}]
    write_csv_atomic(str(tmp_path / 'r.csv'), rows, ['corruption', 'severity', 'top1'])
    with open(tmp_path / 'r.csv') as f:
        got = list(csv.DictReader(f))
    assert got == [{'corruption': 'fog', 'severity': '1', 'top1': '70.0'},
                   {'corruption': 'snow', 'severity': '2', 'top1': ''}]
    with pytest.raises(ValueError):  # a misspelt field must not vanish
        write_csv_atomic(str(tmp_path / 'bad.csv'), [{'top_1': 1}], ['top1'])
    assert not (tmp_path / 'bad.csv').exists()
    (tmp_path / 'f.bin').write_bytes(b'abc')
    assert file_digest(str(tmp_path / 'f.bin')) == (
        'ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad')
