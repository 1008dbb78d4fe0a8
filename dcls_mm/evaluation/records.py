"""Resumable records of finished evaluation sets, and atomic result files.

Robustness runs evaluate many independent *sets* (a corruption at a severity, or a
whole small benchmark). Each finished set is appended to ``<out>/records.jsonl`` the
moment it completes (one JSON object per line, flushed and fsynced), so a run killed
after 40 of 75 sets restarts at set 41. The first line holds the run's *fingerprint*
(model, checkpoint digest, preprocessing, ...): a rerun whose fingerprint differs is
refused, naming the fields that changed, instead of silently mixing results of two
models in one table.

Both robustness tools (``tools/robustness/evaluate.py`` for classifiers and
``tools/robustness/test_downstream.py`` for detectors/segmentors) use this module.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import os.path as osp
from typing import Any, Dict, Iterable, List, Optional, Sequence

from dcls_mm.utils.fileio import atomic_open

__all__ = ['SetRecords', 'FingerprintMismatch', 'write_json_atomic', 'write_csv_atomic',
           'file_digest']


class FingerprintMismatch(ValueError):
    """The records in an output folder were produced by a different run configuration."""


def file_digest(path: str, algorithm: str = 'sha256', chunk: int = 1 << 20) -> str:
    """Hex digest of a file's bytes (identifies a checkpoint in a fingerprint)."""
    h = hashlib.new(algorithm)
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(chunk), b''):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: str, obj: Any) -> None:
    """``json.dump(obj)`` (indent 2) to ``path`` atomically."""
    with atomic_open(path, 'w') as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write('\n')


def write_csv_atomic(path: str, rows: Iterable[Dict[str, Any]],
                     columns: Sequence[str]) -> None:
    """Write ``rows`` (dicts) as CSV with the header ``columns`` atomically; missing
    fields are left empty, extra fields raise (a typo must not vanish silently)."""
    rows = list(rows)
    with atomic_open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)


class SetRecords:
    """Append-only, resumable store of finished sets in ``path`` (JSON lines).

    Line 1 is ``{"fingerprint": {...}}``; every further line is
    ``{"key": <set key>, "record": {...}}``. A truncated last line (a kill during the
    write) is ignored and overwritten by the next :meth:`add`.

    Args:
        path: the ``.jsonl`` file (created with its folder when missing).
        fingerprint: JSON-serialisable description of everything that changes the
            numbers (model name, checkpoint digest, preprocessing, data roots, ...).

    Raises:
        FingerprintMismatch: ``path`` exists and was written with another fingerprint;
            the message names the differing fields.
    """

    def __init__(self, path: str, fingerprint: Dict[str, Any]):
        self.path = path
        # a JSON round trip normalises tuples to lists, so comparisons are stable
        self.fingerprint = json.loads(json.dumps(fingerprint))
        self._records: Dict[str, Dict[str, Any]] = {}
        if osp.exists(path) and osp.getsize(path) > 0:
            self._read()
        else:
            os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
            with open(path, 'w') as f:
                f.write(json.dumps({'fingerprint': self.fingerprint}) + '\n')
                f.flush()
                os.fsync(f.fileno())

    def _read(self) -> None:
        with open(self.path) as f:
            text = f.read()
        lines = text.split('\n')
        try:
            head = json.loads(lines[0])['fingerprint']
        except (ValueError, KeyError, TypeError):
            raise FingerprintMismatch(
                f'{self.path}: first line is not a dcls-mm records header; use another '
                'output folder') from None
        if head != self.fingerprint:
            keys = sorted(set(head) | set(self.fingerprint))
            diff = [k for k in keys if head.get(k) != self.fingerprint.get(k)]
            raise FingerprintMismatch(
                f'{self.path} holds results of a different run (changed: '
                f'{", ".join(f"{k}: {head.get(k)!r} -> {self.fingerprint.get(k)!r}" for k in diff)}); '
                'use another --out-dir (or delete the folder) to start over')
        good = len(lines[0]) + 1  # length of the records read (ASCII: json.dumps escapes)
        for i, line in enumerate(lines[1:], 1):
            if line:
                try:
                    entry = json.loads(line)
                    self._records[entry['key']] = entry['record']
                except (ValueError, KeyError, TypeError):
                    break  # a write cut short by a kill: drop it and everything after
            if line or i < len(lines) - 1:  # (the text after the last newline has none)
                good += len(line) + 1
        with open(self.path, 'r+') as f:  # appends must start on a line of their own
            if good > len(text):  # a whole last record that lost only its newline
                f.seek(len(text))
                f.write('\n')
            else:  # drop a torn tail
                f.truncate(good)

    def __contains__(self, key: str) -> bool:
        return key in self._records

    def __len__(self) -> int:
        return len(self._records)

    def get(self, key: str) -> Optional[Dict[str, Any]]:
        """The record of a finished set, or ``None``."""
        return self._records.get(key)

    def items(self) -> List[tuple]:
        """``(key, record)`` pairs in completion order."""
        return list(self._records.items())

    def add(self, key: str, record: Dict[str, Any]) -> None:
        """Record a finished set (durably: flushed and fsynced before returning).

        Raises:
            KeyError: ``key`` was recorded already (a set is evaluated once).
        """
        if key in self._records:
            raise KeyError(f'set {key!r} is already recorded in {self.path}')
        line = json.dumps({'key': key, 'record': record})
        with open(self.path, 'a') as f:
            f.write(line + '\n')
            f.flush()
            os.fsync(f.fileno())
        self._records[key] = json.loads(json.dumps(record))
