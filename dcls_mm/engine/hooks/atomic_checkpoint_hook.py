"""Checkpoints that a kill cannot truncate, and resume that skips a truncated one.

mmengine's ``CheckpointHook`` writes a checkpoint straight to its final name, so a
``SIGKILL`` during the write leaves a truncated file there. :class:`AtomicCheckpointHook`
writes each file under a temporary name in the same folder, ``fsync``s it and renames it
(``os.replace``, atomic on POSIX): a checkpoint file is either complete or absent.
Before a resume it checks the named checkpoint (``--resume CKPT``, or the work dir's
``last_checkpoint``) and, when that one is empty or truncated, resumes from the newest
complete checkpoint of the work dir, with one warning line.
"""
from __future__ import annotations

import glob
import logging
import os
import os.path as osp
import zipfile
from typing import List, Optional, Tuple, Union

from mmengine.fileio import LocalBackend, register_backend
from mmengine.hooks import CheckpointHook
from mmengine.logging import print_log

from dcls_mm.registry import HOOKS
from dcls_mm.utils.fileio import atomic_write

#: mmengine file backend name of :class:`AtomicLocalBackend`.
ATOMIC_BACKEND = 'dcls_mm_atomic_local'
CHECKPOINT_SUFFIXES = ('.pth', '.pt', '.ckpt')


@register_backend(ATOMIC_BACKEND, force=True)
class AtomicLocalBackend(LocalBackend):
    """mmengine's local file backend whose writes are atomic (temp file + rename)."""

    def put(self, obj: bytes, filepath: Union[str, os.PathLike]) -> None:
        """Write ``obj`` to ``filepath``: complete, or not at all.

        Args:
            obj: the bytes to write.
            filepath: destination; its folder is created if needed.
        """
        atomic_write(filepath, obj)

    def put_text(self, obj: str, filepath: Union[str, os.PathLike],
                 encoding: str = 'utf-8') -> None:
        """Write text ``obj`` to ``filepath`` atomically.

        Args:
            obj: the text.
            filepath: destination.
            encoding: text encoding.
        """
        atomic_write(filepath, obj.encode(encoding))


def checkpoint_problem(path: Optional[str]) -> Optional[str]:
    """Why ``path`` cannot be a checkpoint to resume from, or ``None`` if it looks complete.

    Only what a kill or a full disk leaves behind is detected (missing, empty, a torch
    zip file without its end or with a CRC error); whether the content is a valid
    checkpoint is for the loader to say.

    Args:
        path: checkpoint path (``None``/empty: nothing named).
    """
    if not path:
        return 'no checkpoint is named'
    if not osp.isfile(path):
        return 'the file does not exist'
    if osp.getsize(path) == 0:
        return 'the file is empty'
    with open(path, 'rb') as f:
        is_zip = f.read(4) == b'PK\x03\x04'
    if not is_zip:
        return None  # not torch's zip format: let the checked loader judge it
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        return f'it is truncated or corrupt ({err})'
    if bad is not None:
        return f'it is corrupt (CRC error in {bad})'
    return None


def _newest_first(folder: str) -> List[str]:
    files = [p for p in glob.glob(osp.join(folder, '*')) if p.endswith(CHECKPOINT_SUFFIXES)
             and osp.isfile(p)]
    return sorted(files, key=lambda p: (os.stat(p).st_mtime_ns, p), reverse=True)


def find_resumable_checkpoint(named: Optional[str],
                              folders: Tuple[str, ...]) -> Tuple[Optional[str], Optional[str]]:
    """The checkpoint to resume from: ``named`` if it is complete, else the newest complete
    checkpoint (``*.pth``/``*.pt``/``*.ckpt``) in ``folders``.

    Args:
        named: the checkpoint asked for (``--resume CKPT`` or ``last_checkpoint``).
        folders: where to look for another one, in order (the work dir, the folder of
            the checkpoints ``last_checkpoint`` names).

    Returns:
        ``(path, problem)``: ``problem`` is ``None`` when ``named`` itself is used, else
        why it was not; ``path`` is ``None`` when no complete checkpoint exists.
    """
    problem = checkpoint_problem(named)
    if problem is None:
        return named, None
    seen = set()
    for folder in (osp.abspath(f) for f in folders):
        if folder in seen:
            continue
        seen.add(folder)
        for path in _newest_first(folder):
            if osp.abspath(path) != osp.abspath(named or '') and checkpoint_problem(path) is None:
                return path, problem
    return None, problem


def _read_last_checkpoint(work_dir: str) -> Optional[str]:
    """The path in ``work_dir/last_checkpoint`` (``None`` if that file does not exist)."""
    save_file = osp.join(work_dir, 'last_checkpoint')
    if not osp.isfile(save_file):
        return None
    with open(save_file) as f:
        return f.read().strip()


@HOOKS.register_module()
class AtomicCheckpointHook(CheckpointHook):
    """mmengine's ``CheckpointHook`` with atomic writes and a resume fallback.

    Config: ``default_hooks = dict(checkpoint=dict(type='dcls_mm.AtomicCheckpointHook',
    interval=1))`` (our configs and ``tools/train.py`` set it).

    * every checkpoint file is written to a temporary file in the same folder, flushed
      and renamed: a kill leaves the previous files intact and never a truncated
      checkpoint under a checkpoint name (mmengine still writes the small
      ``last_checkpoint`` text file in place; a broken one is handled as below);
    * before a resume (``--resume [CKPT]``), if the named checkpoint, or the one
      ``last_checkpoint`` names, is empty or truncated (or, for ``last_checkpoint``,
      missing), the newest complete checkpoint in the work dir (or in the folder
      ``last_checkpoint`` points to) is resumed instead, with one warning line; if there is none, a ``RuntimeError`` says so. A
      ``--resume CKPT`` that does not exist is a ``FileNotFoundError``.

    Args:
        *args: positional arguments of ``mmengine.hooks.CheckpointHook``.
        backend_args: as in ``CheckpointHook``; ``None`` (default) uses
            :class:`AtomicLocalBackend` for local ``out_dir`` (remote back-ends are used
            as given).
        **kwargs: other keyword arguments of ``mmengine.hooks.CheckpointHook``
            (``interval``, ``by_epoch``, ``max_keep_ckpts``...).
    """

    def __init__(self, *args, backend_args: Optional[dict] = None, **kwargs) -> None:
        out_dir = kwargs.get('out_dir', args[4] if len(args) > 4 else None)
        local = out_dir is None or '://' not in str(out_dir)
        if backend_args is None and local and kwargs.get('file_client_args') is None:
            backend_args = dict(backend=ATOMIC_BACKEND)
        super().__init__(*args, backend_args=backend_args, **kwargs)

    def before_run(self, runner) -> None:
        """Swap a truncated resume checkpoint for the newest complete one (before the
        Runner loads it).

        Args:
            runner: the mmengine runner (``runner._resume``/``runner._load_from`` are read
                and ``_load_from`` may be replaced).
        """
        super().before_run(runner)
        if not getattr(runner, '_resume', False):
            return
        named = runner._load_from
        folders = [runner.work_dir]  # never another run's folder next to a named file
        if named is not None and not osp.exists(named):
            # a typo, not a kill (files appear complete or not at all): no guessing
            raise FileNotFoundError(f'cannot resume: checkpoint {named!r} does not exist')
        if named is None:
            named = _read_last_checkpoint(runner.work_dir)
            if named is None:  # no checkpoint yet: mmengine starts from scratch
                return
            if named:  # checkpoints may live in an out_dir outside the work dir
                folders.append(osp.dirname(osp.abspath(named)))
        path, problem = find_resumable_checkpoint(named, tuple(folders))
        if problem is None:
            return
        if path is None:
            raise RuntimeError(f'cannot resume: checkpoint {named!r} cannot be loaded '
                               f'({problem}) and {runner.work_dir} holds no complete '
                               'checkpoint')
        print_log(f'resume: checkpoint {named!r} cannot be loaded ({problem}); resuming from '
                  f'{path}, the newest complete checkpoint', logger='current',
                  level=logging.WARNING)
        runner._load_from = path
