"""Keeping orbax's reports of a failure it has already raised off the user's terminal.

When a checkpoint read or write fails, orbax raises the error (which `checkpoint` turns into
one line) and also reports it, or its side effects, from its threads: logs with a traceback
per thread, unraisable exceptions of abandoned reads, asyncio's "never retrieved" notes.
Each filter here drops exactly one such report and nothing else.
"""

from __future__ import annotations

import inspect
import logging
import sys

_FAILED_WRITE_LOGS = ("_SignalingThread.run() raised an exception",
                      "Checkpointer failed: one or more items may not be finalized",
                      "Handler Commit operations or the Commit callback",
                      "Save Finalize thread", "failed to finalize checkpoint")


def quiet_failed_writes() -> None:
    """Drop orbax's logs of a failed background write (a traceback per thread, ~1000 lines
    for one full disk) and the reports of the writes it abandoned: `Checkpoints._write`
    raises the error itself, in one line."""
    drop_reports_of_abandoned_reads()
    absl = logging.getLogger("absl")
    if not any(isinstance(f, DropMessages) for f in absl.filters):
        absl.addFilter(DropMessages(_FAILED_WRITE_LOGS))


class DropMessages(logging.Filter):
    """Drops log records whose message contains any of `texts`."""

    def __init__(self, texts: tuple[str, ...]):
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(t in message for t in self.texts)


def drop_reports_of_abandoned_reads() -> None:
    """Keep tensorstore's reads that orbax abandoned from printing a traceback each.

    When one read of a checkpoint fails, orbax raises its error and abandons the others,
    which then report around the one-line error in three ways:
    - they finish on tensorstore's threads after orbax's event loop has closed, and hand
      their results to it through `call_soon_threadsafe`, which raises "Event loop is
      closed" as an unraisable exception (no object; raised by asyncio's closed check);
    - their futures, never awaited, are logged by asyncio as "exception was never
      retrieved" with tensorstore's error;
    - orbax's per-shard read coroutines, closed unfinished when collected, raise from their
      error handler ("Exception ignored in: <coroutine _read_array_index_and_device_put>").
    Only those reports are dropped; any other goes where it went before. Installed once per
    process (the unraisable hook again if something replaced it since).
    """
    previous = sys.unraisablehook
    if not getattr(previous, "_gptjax_drops_abandoned_reads", False):
        def hook(unraisable):
            if not _abandoned_read(unraisable):
                previous(unraisable)

        hook._gptjax_drops_abandoned_reads = True
        sys.unraisablehook = hook
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _UnretrievedReadFilter) for f in asyncio_log.filters):
        asyncio_log.addFilter(_UnretrievedReadFilter())


def _abandoned_read(unraisable) -> bool:
    """Whether an unraisable report is one of an abandoned read's (see above)."""
    exc, tb, obj = unraisable.exc_value, unraisable.exc_traceback, unraisable.object
    if inspect.iscoroutine(obj):
        return obj.__qualname__ == "_read_array_index_and_device_put"
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return (type(exc) is RuntimeError and str(exc) == "Event loop is closed" and obj is None
            and tb is not None and tb.tb_frame.f_code.co_name == "_check_closed")


class _UnretrievedReadFilter(logging.Filter):
    """Drops asyncio's "exception was never retrieved" for a failed tensorstore read."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not ("exception was never retrieved" in str(record.msg)
                    and "tensorstore_spec" in str(exc))
