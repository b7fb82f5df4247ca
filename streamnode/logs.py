"""Where the node's log lines go, without ever making a node thread wait for them.

A node is often started by a program that never reads its output (a TouchDesigner or OBS
script with `stdout=PIPE`, a suspended terminal, a stuck log shipper). Writing to such an output
blocks once its buffer (64 KB for a pipe) is full, and a thread that logs would block with it.
So no node thread writes:

- Every log record goes through the root logger's one handler (`LogRouter`) into a bounded queue
  per output (the console, the log file); appending never waits on I/O.
- One writer thread per output (`log-writer:console`, `log-writer:file`) formats and writes.
  While its output is stuck the queue keeps the newest 256 KB of records and drops the oldest,
  counting them; once the output moves again the next line says "N log lines dropped: the
  output was not being read", where the gap is.
- Text written straight to stdout or stderr (print, progress bars, C libraries) is caught at
  the file-descriptor level (`_StdioCapture`): descriptors 1 and 2 point at a pipe that a drain
  thread reads line by line into the same queues.
- Shutdown waits for an output only while it moves (`Logs.close`): a stuck one is left to its
  writer thread (a daemon), and the exit code never waits on it.

`--log-file` adds a size-capped rotating file (`path`, `path.1` … `path.N`), `--log-format json`
writes one JSON object per line, `--quiet` turns the console off. docs/logging.md has the whole.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, Literal, Protocol

LogFormat = Literal["text", "json"]

QUEUE_BYTES = 256 * 1024  # log text held per output while it is stuck (the newest is kept)
RECORD_OVERHEAD = 64  # bytes a record costs beyond its text: time, level, logger name
PIECE_BYTES = 4096  # one write at most: PIPE_BUF, so a write to a pipe is atomic and progress is seen
STALL_S = 0.25  # a write taking longer than this: the output is not being read
CLOSE_TIMEOUT_S = 0.5  # at most this long at exit for outputs that are still moving
MAX_LINE = 65536  # a captured line without a newline is cut here (a runaway progress bar)

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
CONSOLE_TIME = "%H:%M:%S"
FILE_TIME = "%Y-%m-%d %H:%M:%S"
STDIO_LOGGER = "stdio"  # the name captured stdout/stderr lines carry (in JSON, "logger")

logger = logging.getLogger(__name__)


class LogSetupError(RuntimeError):
    """The log file cannot be opened. The message names the path and the reason."""


# -- formats --------------------------------------------------------------------------------------


class TextFormatter(logging.Formatter):
    """`12:00:01 INFO    streamnode.node.lifecycle: message`; captured stdout/stderr lines as they were."""

    def __init__(self, datefmt: str) -> None:
        super().__init__(TEXT_FORMAT, datefmt=datefmt)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 - logging's name
        text = time.strftime(datefmt or CONSOLE_TIME, self.converter(record.created))
        # A file spans days and is read after the fact: milliseconds there; the console stays short.
        return f"{text}.{int(record.msecs):03d}" if datefmt == FILE_TIME else text

    def format(self, record: logging.LogRecord) -> str:
        if record.name == STDIO_LOGGER:
            return record.getMessage()
        return super().format(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO 8601, local, with offset), level, logger, thread, message,
    and exception (the traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "thread": record.threadName,
            "message": record.getMessage(),
        }
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        dropped = getattr(record, "dropped", None)
        if dropped is not None:
            entry["dropped"] = dropped
        return json.dumps(entry, ensure_ascii=False, default=str)


def _formatter(fmt: LogFormat, datefmt: str) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else TextFormatter(datefmt)


# -- destinations ---------------------------------------------------------------------------------


class Destination(Protocol):
    """Where an output's writer thread writes. `write()` may block; only that thread calls it."""

    where: str  # for "cannot write <where>"
    stuck_reason: str  # for "N log lines dropped: <stuck_reason>"

    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...


class Console:
    """A duplicate of descriptor `fd` (the process's stderr as it was at start), written unbuffered.

    Unbuffered raw I/O holds no Python lock while a write blocks, so a writer thread stuck on
    it cannot stall the interpreter's exit (a buffered stream's lock would). On a Windows
    console `open()` gives the console's own raw I/O, which writes Unicode correctly.
    """

    def __init__(self, fd: int) -> None:
        self.fd = os.dup(fd)
        self._raw: BinaryIO = open(self.fd, "wb", buffering=0, closefd=False)  # noqa: SIM115 - lives with the output
        self.where = "the console"
        self.stuck_reason = "the output was not being read"

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = self._raw.write(view)
            view = view[n or 0:]

    def close(self) -> None:
        self._raw.close()
        os.close(self.fd)


class RotatingFile:
    """A log file capped at `max_bytes`: when the next write would pass it, `path` becomes
    `path.1` (`path.1` becomes `path.2` …, `path.{backups}` is deleted) and a new `path` starts.
    With `backups` 0 the file starts over. Rotation happens between lines."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.where = str(path)
        self.stuck_reason = f"{path} could not keep up"
        try:
            self._file = self._open()
        except OSError as e:
            raise LogSetupError(f"cannot write the log file {path}: {e.strerror or e}; give --log-file "
                                "(runtime.log_file) a path in a folder you can write to") from None
        self._size = os.fstat(self._file.fileno()).st_size

    def _open(self) -> BinaryIO:
        return open(self.path, "ab", buffering=0)  # noqa: SIM115 - kept open between writes

    def write(self, data: bytes) -> None:
        start = 0
        while start < len(data):
            room = self.max_bytes - self._size
            end = len(data) if len(data) - start <= room else data.rfind(b"\n", start, start + max(room, 0)) + 1
            if end <= start:  # the next line does not fit
                if self._size:
                    self._rotate()
                    continue
                end = data.find(b"\n", start) + 1 or len(data)  # longer than the cap: a file of its own
            self._write_all(memoryview(data)[start:end])
            start = end

    def _write_all(self, view: memoryview) -> None:
        while view:
            n = self._file.write(view) or 0
            view = view[n:]
            self._size += n

    def _rotate(self) -> None:
        self._file.close()
        try:
            if self.backups:
                for i in range(self.backups - 1, 0, -1):
                    older = self.path.with_name(f"{self.path.name}.{i}")
                    if older.exists():
                        os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
                os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
            else:
                self.path.unlink()
        except OSError:
            pass  # held open elsewhere (Windows): keep appending past the cap rather than lose lines
        self._file = self._open()
        self._size = os.fstat(self._file.fileno()).st_size

    def close(self) -> None:
        self._file.close()


# -- one output: a bounded queue and its writer thread --------------------------------------------


class LogOutput:
    """One destination with a bounded queue and the one thread that writes to it.

    `offer()` is called from any thread and never waits on I/O: when the queue holds
    `capacity` bytes of log text the oldest records are dropped and counted. The writer
    reports the count where the gap is, once its output moves again, and reports lines it
    could not write (a full disk) the same way.
    """

    def __init__(self, name: str, destination: Destination, formatter: logging.Formatter,
                 capacity: int = QUEUE_BYTES) -> None:
        self.name = name
        self.destination = destination
        self.formatter = formatter
        self.capacity = capacity
        self.dropped = 0  # records dropped from the queue, all told
        self.lost = 0  # records that could not be written (an I/O error), all told
        self._queue: deque[logging.LogRecord] = deque()
        self._queued_bytes = 0
        # Reentrant: a signal handler on the main thread may log while the main thread is in offer().
        self._cond = threading.Condition(threading.RLock())
        self._unreported_drops = 0
        self._unreported_loss = 0
        self._loss_reason = ""
        self._busy = False  # a batch is being formatted or written
        self._piece_started = 0.0  # when the write in progress began (0: none)
        self._stopping = False
        self._broken = False  # the reader went away for good (a closed pipe): write nothing more
        self._thread = threading.Thread(target=self._run, name=f"log-writer:{name}", daemon=True)
        self._thread.start()

    def offer(self, record: logging.LogRecord) -> None:
        with self._cond:
            if self._broken:
                return
            size = _size(record)
            while self._queue and self._queued_bytes + size > self.capacity:
                self._queued_bytes -= _size(self._queue.popleft())
                self.dropped += 1
                self._unreported_drops += 1
            self._queue.append(record)
            self._queued_bytes += size
            self._cond.notify()

    def stalled(self) -> bool:
        """A write has been waiting longer than `STALL_S`: nobody is reading this output."""
        started = self._piece_started
        return bool(started) and time.monotonic() - started > STALL_S

    def idle(self) -> bool:
        with self._cond:
            return self._broken or (not self._queue and not self._busy)

    def wait_idle(self, deadline: float) -> bool:
        """Wait until everything queued is written, while the output moves, until `deadline`."""
        with self._cond:
            while not (self._broken or (not self._queue and not self._busy)):
                left = deadline - time.monotonic()
                if left <= 0 or self.stalled():
                    return False
                self._cond.wait(min(left, STALL_S / 5))
            return True

    def stop(self) -> None:
        """The writer ends once its queue is empty (at once if it is stuck: it is a daemon)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def close(self) -> None:
        """Close the destination, unless a write is stuck on it (then it goes with the process)."""
        if self._thread.is_alive():
            self._thread.join(STALL_S)
        if not self._thread.is_alive():
            self.destination.close()

    # -- the writer thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue or self._broken:
                    return
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), 256))]
                self._queued_bytes -= sum(_size(r) for r in batch)
                notes = self._take_notes()
                self._busy = True
            try:
                self._write_batch(notes + batch)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _take_notes(self) -> list[logging.LogRecord]:
        notes = []
        if self._unreported_drops:
            n, self._unreported_drops = self._unreported_drops, 0
            notes.append(_note(f"{n} log lines dropped: {self.destination.stuck_reason}", n))
        if self._unreported_loss:
            n, self._unreported_loss = self._unreported_loss, 0
            notes.append(_note(f"{n} log lines lost: cannot write {self.destination.where}: {self._loss_reason}", n))
        return notes

    def _note_loss(self, count: int, reason: str) -> None:
        self.lost += count
        self._unreported_loss += count
        self._loss_reason = reason

    def _write_batch(self, records: list[logging.LogRecord]) -> None:
        # Pieces of at most PIECE_BYTES, cut between lines: each write shows progress (or its
        # absence), a file rotates between lines, and a pipe gets whole lines atomically.
        pieces: list[tuple[bytes, int]] = []
        piece, count = b"", 0
        for record in records:
            line = self._format(record).encode("utf-8", "replace") + b"\n"
            if piece and len(piece) + len(line) > PIECE_BYTES:
                pieces.append((piece, count))
                piece, count = b"", 0
            piece += line
            count += 1
        pieces.append((piece, count))
        for i, (data, _) in enumerate(pieces):
            self._piece_started = time.monotonic()
            try:
                self.destination.write(data)
            except BrokenPipeError:
                with self._cond:
                    self._broken = True  # the reader closed its end: nothing will ever read this
                    self._queue.clear()
                    self._queued_bytes = 0
                return
            except OSError as e:
                with self._cond:
                    self._note_loss(sum(n for _, n in pieces[i:]), e.strerror or str(e))
                return
            finally:
                self._piece_started = 0.0

    def _format(self, record: logging.LogRecord) -> str:
        try:
            return self.formatter.format(record)
        except Exception as e:  # noqa: BLE001 - one odd record must not cost the others
            return f"(a log record from {record.name} could not be formatted: {type(e).__name__}: {e})"


def _size(record: logging.LogRecord) -> int:
    """What a queued record counts against the capacity (its text is final: see `_prepared`)."""
    return len(record.msg) + len(record.exc_text or "") + RECORD_OVERHEAD


def _note(message: str, count: int) -> logging.LogRecord:
    record = logging.makeLogRecord({"name": __name__, "levelno": logging.WARNING, "levelname": "WARNING",
                                    "msg": message, "threadName": threading.current_thread().name})
    record.dropped = count
    return record


# -- the root logger's handler --------------------------------------------------------------------


class LogRouter(logging.Handler):
    """Hands each record to every output; the calling thread only formats the message."""

    def __init__(self, outputs: list[LogOutput]) -> None:
        super().__init__()
        self.outputs = outputs

    def emit(self, record: logging.LogRecord) -> None:
        try:
            prepared = _prepared(record, self)
        except Exception:  # noqa: BLE001 - a bad format string: logging's own report
            self.handleError(record)
            return
        for output in self.outputs:
            output.offer(prepared)

    def offer_line(self, name: str, line: str) -> None:
        record = logging.makeLogRecord({"name": name, "levelno": logging.INFO, "levelname": "INFO", "msg": line,
                                        "threadName": threading.current_thread().name})
        for output in self.outputs:
            output.offer(record)


def _prepared(record: logging.LogRecord, handler: logging.Handler) -> logging.LogRecord:
    """A copy the writer may format later: the message merged (its arguments may change), the
    traceback turned to text (it holds the frames alive), the original left for other handlers."""
    copy = logging.makeLogRecord(record.__dict__)
    copy.msg = record.getMessage()
    copy.args = None
    if record.exc_info:
        copy.exc_text = record.exc_text or (handler.formatter or logging.Formatter()).formatException(record.exc_info)
    copy.exc_info = None
    return copy


# -- stdout and stderr at the file-descriptor level -----------------------------------------------


class _StdioCapture:
    """Descriptors 1 and 2 point at a pipe; a drain thread reads it line by line into the outputs.

    Whatever writes there (print, tqdm, a C library, the interpreter's own warnings) then never
    waits on the real output. A `\\r`-redrawn line (a progress bar) becomes its last state.
    """

    def __init__(self, deliver: Callable[[str], None]) -> None:
        self._deliver = deliver
        self._marker = f"\0streamnode-log-end-{uuid.uuid4().hex}".encode()
        self._saved: dict[int, int] = {}
        _flush_std()
        for fd in (1, 2):
            # No such descriptor (a GUI process without a console): nothing to redirect.
            with contextlib.suppress(OSError):
                self._saved[fd] = os.dup(fd)
        self._read, self._write = os.pipe()
        for fd in self._saved:
            os.dup2(self._write, fd)
        self._thread = threading.Thread(target=self._drain, name="log-stdio", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(self._read, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if line == self._marker:
                    pending = b""
                    return
                self._line(line)
            if len(pending) > MAX_LINE:
                self._line(pending)
                pending = b""
        if pending:
            self._line(pending)

    def _line(self, raw: bytes) -> None:
        # A progress bar redraws its line with \r: keep what a terminal would show at the end.
        parts = [p for p in raw.rstrip(b"\r").split(b"\r") if p.strip()]
        if parts:
            self._deliver(parts[-1].decode("utf-8", "replace"))

    def close(self, restore: bool, timeout: float) -> None:
        """Put descriptors 1 and 2 back (`restore`) or onto the null device (the real output is
        stuck: a late write there must not block the exit), after the drain has read everything."""
        _flush_std()
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            for fd, saved in self._saved.items():
                os.dup2(saved if restore else null, fd)
                os.close(saved)
        finally:
            os.close(null)
        # Children may hold the pipe's write end (no end-of-file then): a marker ends the drain.
        if self._thread.is_alive():
            os.write(self._write, b"\n" + self._marker + b"\n")
            self._thread.join(timeout)
        os.close(self._write)
        if not self._thread.is_alive():
            os.close(self._read)


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            with contextlib.suppress(OSError, ValueError):
                stream.flush()


# -- the whole -----------------------------------------------------------------------------------


class Logs:
    """The run's logging, from `start_logging()` to `close()` (or the end of a `with` block)."""

    def __init__(self, router: LogRouter, capture: _StdioCapture | None, restore: Callable[[], None]) -> None:
        self.router = router
        self.capture = capture
        self._restore = restore
        self._closed = False

    @property
    def outputs(self) -> list[LogOutput]:
        return self.router.outputs

    def drain(self, timeout: float) -> bool:
        """Wait for every output that moves to write what it holds; True if all did in time."""
        deadline = time.monotonic() + timeout
        return all([o.wait_idle(deadline) for o in self.outputs])

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Back to plain logging. Waits at most `timeout`, and not at all for a stuck output."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout
        console_moves = not any(o.stalled() for o in self.outputs if isinstance(o.destination, Console))
        if self.capture is not None:
            self.capture.close(restore=console_moves, timeout=max(0.0, deadline - time.monotonic()))
        self._restore()
        for output in self.outputs:
            output.stop()
        for output in self.outputs:
            output.wait_idle(deadline)
        for output in self.outputs:
            if output.idle():
                output.close()

    def __enter__(self) -> Logs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_logging(level: str, fmt: LogFormat = "text", *, file: Path | None = None,
                  file_max_bytes: int = 10 * 2**20, file_backups: int = 3, console: bool = True,
                  capture_stdio: bool = True, capacity: int = QUEUE_BYTES) -> Logs:
    """Send every log line (and, with `capture_stdio`, everything written to descriptors 1 and
    2) to the console and/or `file` through non-blocking queues. Raises `LogSetupError` for a
    file that cannot be opened, before anything changes."""
    outputs: list[LogOutput] = []
    if file is not None:
        destination = RotatingFile(file, file_max_bytes, file_backups)
        outputs.append(LogOutput("file", destination, _formatter(fmt, FILE_TIME), capacity))
    if console:
        # No stderr at all (a GUI launch on Windows): the file, if any, is the log.
        with contextlib.suppress(OSError):
            outputs.append(LogOutput("console", Console(2), _formatter(fmt, CONSOLE_TIME), capacity))
    router = LogRouter(outputs)
    root = logging.getLogger()
    # Handlers that write to the console themselves would block with it: they step aside.
    displaced = [h for h in root.handlers if isinstance(h, logging.StreamHandler)
                 and not isinstance(h, logging.FileHandler)
                 and getattr(h, "stream", None) in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)]
    old_level = root.level
    old_excepthook = threading.excepthook
    for h in displaced:
        root.removeHandler(h)
    root.addHandler(router)
    root.setLevel(getattr(logging, level.upper()))
    logging.captureWarnings(True)
    threading.excepthook = _log_thread_exception

    def restore() -> None:
        root.removeHandler(router)
        for h in displaced:
            root.addHandler(h)
        root.setLevel(old_level)
        logging.captureWarnings(False)
        threading.excepthook = old_excepthook

    capture = None
    if capture_stdio:
        capture = _StdioCapture(lambda line: router.offer_line(STDIO_LOGGER, line))
    return Logs(router, capture, restore)


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    logger.error("thread %s ended with an exception", name,
                 exc_info=(args.exc_type, args.exc_value, args.exc_traceback))  # type: ignore[arg-type]
