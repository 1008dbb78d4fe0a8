"""What the command-line tools show on the console: the known third-party chatter is
kept off it, narrowly (by message and category, never all warnings), and third-party
``print`` output goes to a log file instead.

Torch-free and mmengine-free on purpose: the tools call :func:`ignore_known_warnings`
before they import mmengine, whose import of ``pkg_resources`` issues the first of these
warnings.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from typing import Iterator, Tuple, Type

#: ``(message regex, category, module regex)`` of Python warnings that say nothing a
#: user of our configs can act on (advice for the authors of the pinned mmengine 0.10 /
#: mmdet 3.3 / mmseg 1.2 about their own internals): setuptools >= 81 warns on every
#: import of ``pkg_resources`` (mmengine, imagecorruptions); mmdet's mask head copies a
#: tensor with ``new_tensor``; mmseg's UperNet builds its loss with its own deprecated
#: ``build_loss``, warns that ``avg_non_ignore`` defaults to False, that its
#: visualisation hook does not draw (``draw=False`` is the default) and that its
#: ``LoadAnnotations`` ``reduce_zero_label`` argument will move; mmengine warns when a
#: second Runner in one process (the demo, the tests) reuses the visualizer's name.
KNOWN_WARNINGS: Tuple[Tuple[str, Type[Warning], str], ...] = (
    ('pkg_resources is deprecated as an API', UserWarning, ''),
    ('To copy construct from a tensor', UserWarning, r'mmdet\.'),
    ('``build_loss`` would be deprecated soon', UserWarning, r'mmseg\.'),
    ('Default ``avg_non_ignore`` is False', UserWarning, r'mmseg\.'),
    ('The draw is False, it means that the hook for visualization', UserWarning, r'mmseg\.'),
    ('`reduce_zero_label` will be deprecated', UserWarning, r'mmseg\.'),
    (r"<class '[\w.]+Visualizer'> instance named of visualizer has been created", UserWarning,
     r'mmengine\.'),
)

#: Beginnings of mmengine log records (level WARNING) about mmengine's own deprecated
#: internals, which mmdet 3.3 / mmseg 1.2 still use, and about mmseg's ``IoUMetric``
#: leaving its ``prefix`` unset: kept in the log file, not on the console.
KNOWN_LOG_NOTICES: Tuple[str, ...] = (
    '"FileClient" will be deprecated in future',
    '"HardDiskBackend" is the alias of "LocalBackend"',
    'The prefix is not set in metric class',
)


def ignore_known_warnings() -> None:
    """Install a filter for each of :data:`KNOWN_WARNINGS` (other warnings still show)."""
    for message, category, module in KNOWN_WARNINGS:
        warnings.filterwarnings('ignore', message=message, category=category, module=module)


class KnownNoticeFilter(logging.Filter):
    """A handler filter that drops the records of :data:`KNOWN_LOG_NOTICES`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(KNOWN_LOG_NOTICES)


class _LoggerStream(io.TextIOBase):
    """A text stream that logs each complete line it receives."""

    def __init__(self, logger: logging.Logger, level: int) -> None:
        self._logger, self._level, self._pending = logger, level, ''

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        lines = (self._pending + text).split('\n')
        self._pending = lines.pop()
        for line in lines:
            if line.strip():
                self._logger.log(self._level, line.rstrip())
        return len(text)

    def flush(self) -> None:
        if self._pending.strip():
            self._logger.log(self._level, self._pending.rstrip())
        self._pending = ''


@contextlib.contextmanager
def prints_to_log(logger: logging.Logger, level: int = logging.INFO) -> Iterator[None]:
    """Send what is printed to ``sys.stdout`` meanwhile to ``logger``, line by line.

    For third-party ``print`` output (pycocotools' ``loading annotations into
    memory...`` and ``COCOeval`` tables, as detectron2 wraps ``COCO()`` in
    ``redirect_stdout``): with a logger whose console handler shows only warnings, the
    lines land in its log file. Handlers that wrote to ``sys.stdout`` before the block
    keep writing to the real console.

    Args:
        logger: where the lines go.
        level: their level.
    """
    stream = _LoggerStream(logger, level)
    try:
        with contextlib.redirect_stdout(stream):
            yield
    finally:
        stream.flush()
