"""A node whose output nobody reads must not hang (issue 21): the node's log goes through bounded
queues to one writer per output, drops and counts what a stuck output cannot take, and never
holds up a node thread, the shutdown or the exit code; `--log-file`, `--log-format json`,
`--quiet`."""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path

import pytest
from support import wait_for

from streamnode.commands.run import add_run_arguments, config_from_args, run_command
from streamnode.config import ConfigError
from streamnode.logs import (
    CONSOLE_TIME,
    Console,
    LogOutput,
    RotatingFile,
    TextFormatter,
    start_logging,
)

ROOT = Path(__file__).resolve().parent.parent
DROPPED = re.compile(rb"(\d+) log lines dropped: the output was not being read")
REQUEST = re.compile(rb'"GET /status\.json\?n=(\d+)&')


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def node_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "streamnode.cli", "run", "--engine", "passthrough", "--width", "64",
            "--height", "64", "--no-osc", *args]


def node_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT))


def read_available(fd: int, timeout: float) -> bytes:
    """What the pipe holds now (waiting up to `timeout` for the first byte)."""
    got = b""
    while select.select([fd], [], [], timeout)[0]:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        got += chunk
        timeout = 0.05
    return got


# -- the scenario: a launcher that never reads the pipe -----------------------------------


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="checks the segment file under /dev/shm")
def test_a_node_whose_output_nobody_reads_keeps_serving_and_stops_at_once() -> None:
    port = free_tcp_port()
    name = f"sn_log{uuid.uuid4().hex[:8]}"
    # Debug level: every request to the web preview is a log line; the metrics line is silenced
    # so that every line in the test's window is a request line, numbered.
    proc = subprocess.Popen(
        node_argv("--source", "test://moving?fps=120", "--sink", f"shm://{name}",
                  "--sink", f"http://127.0.0.1:{port}", "--log-level", "debug",
                  "--set", "runtime.metrics_interval_s=3600"),
        cwd=ROOT, env=node_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    out = proc.stdout
    assert out is not None
    pad = "x" * 2000  # each request is a 2 KB log line: well over 64 KB in a few hundred requests

    def request(n: int) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3.0)
        try:
            conn.request("GET", f"/status.json?n={n}&{pad}")
            response = conn.getresponse()
            assert response.status == 200
            return json.loads(response.read())
        finally:
            conn.close()

    def up() -> bool:
        assert proc.poll() is None, read_available(out.fileno(), 0.1)[-3000:]
        try:
            return request(-1)["frames_out"] > 0
        except OSError:
            return False

    try:
        wait_for(up, timeout=60, what="the node's web preview", step=0.1)
        # 1. Nobody reads: 600 KB of log lines. Before the fix the 17th request hung (the preview
        #    thread blocked on its log line) and SIGTERM never ended the node.
        frames_before = request(0)["frames_out"]
        for n in range(1, 300):
            status = request(n)
        assert status["frames_out"] > frames_before  # frames still flow

        # 2. The output moves again: the gap is reported where it is, with its exact size.
        seen = b""
        deadline = time.monotonic() + 20
        while not DROPPED.search(seen) and time.monotonic() < deadline:
            seen += read_available(out.fileno(), 0.5)
        notice = DROPPED.search(seen)
        assert notice, seen[-2000:]
        dropped = int(notice.group(1))
        before = [int(n) for n in REQUEST.findall(seen[: notice.start()])]
        after = [int(n) for n in REQUEST.findall(seen[notice.end():])]
        assert before and after, seen[notice.start() - 200: notice.end() + 200]
        assert before == list(range(before[0], before[-1] + 1))  # nothing lost before the gap
        assert after[0] - before[-1] - 1 == dropped > 0  # the gap is exactly the count

        # 3. Stuck again (the rest of the backlog fills the pipe at once), then SIGTERM.
        for n in range(300, 350):
            request(n)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=10)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 0
    assert took < 2.0, f"took {took:.2f} s to exit"
    assert not Path("/dev/shm", name).exists()


# -- --quiet, --log-file, --log-format json ---------------------------------------------------------


def test_quiet_with_a_json_log_file_writes_nothing_to_the_console(tmp_path: Path) -> None:
    log = tmp_path / "node.log"
    done = subprocess.run(
        node_argv("--source", "test://bars?fps=200", "--sink", "null://", "--max-frames", "20",
                  "--quiet", "--log-file", str(log), "--log-format", "json"),
        cwd=ROOT, env=node_env(), capture_output=True, timeout=120,
    )
    assert done.returncode == 0, log.read_text() if log.exists() else done.stderr
    assert done.stdout == b"" and done.stderr == b""
    records = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
    for r in records:
        assert set(r) >= {"time", "level", "logger", "thread", "message"}
        assert datetime.fromisoformat(r["time"]).tzinfo is not None
    assert any(r["logger"] == "streamnode.node.lifecycle" and r["message"].startswith("first frame")
               for r in records)
    # What the command prints to stderr (the summary) reaches the file too.
    assert any(r["logger"] == "stdio" and r["message"].startswith("streamnode: 20 frames out") for r in records)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    return parser.parse_args(list(argv))


def test_log_flags_and_config_keys() -> None:
    cfg = config_from_args(parse("--log-file", "show.log", "--log-format", "json", "--quiet"))
    assert (cfg.runtime.log_file, cfg.runtime.log_format) == ("show.log", "json")
    # A preset (here --set) can carry the file and the format, and the rotation.
    cfg = config_from_args(parse("--set", "runtime.log_file=a.log", "--set", "runtime.log_file_max_mb=2",
                                 "--set", "runtime.log_file_backups=0"))
    assert (cfg.runtime.log_file, cfg.runtime.log_file_max_mb, cfg.runtime.log_file_backups) == ("a.log", 2, 0)
    with pytest.raises(ConfigError, match="runtime.log_format"):
        config_from_args(parse("--set", "runtime.log_format=xml"))
    with pytest.raises(SystemExit):
        parse("--log-format", "xml")


def test_a_log_file_that_cannot_be_written_is_a_usage_error(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "no-such-folder" / "node.log"
    assert run_command(parse("--engine", "passthrough", "--no-osc", "--log-file", str(bad))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(bad) in err and "--log-file" in err


def test_stdout_and_stderr_writes_go_through_the_log(tmp_path: Path) -> None:
    """print, a \\r progress bar, a C-level write without a newline: all reach the log file beside
    the log records (a pipe apart: not necessarily in order with them); after close() the real
    stdout is back."""
    log = tmp_path / "out.log"
    script = f"""
import logging, os, sys
from pathlib import Path
from streamnode.logs import start_logging
logs = start_logging("info", file=Path({str(log)!r}), console=False)
print("from print", flush=True)
os.write(2, b"loading  10%\\rloading  50%\\rloading 100%\\n")
logging.getLogger("t").warning("a warning: %d", 7)
os.write(1, b"no newline at the end")
logs.close()
print("after close")
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=node_env(), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "after close\n" and done.stderr == ""
    lines = log.read_text(encoding="utf-8").splitlines()
    records = [line for line in lines if " WARNING " in line]
    assert len(records) == 1
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} WARNING t: a warning: 7", records[0])
    assert [line for line in lines if line not in records] == ["from print", "loading 100%", "no newline at the end"]


# -- one output, in this process ---------------------------------------------------------------------


def test_a_stuck_output_never_blocks_the_caller_and_reports_each_gap_exactly() -> None:
    read, write = os.pipe()
    output = LogOutput("console", Console(write), TextFormatter(CONSOLE_TIME), capacity=32 * 1024)
    os.close(write)  # the output holds its own duplicate
    log = logging.getLogger("test.stuck")
    total = 5000

    def offer_all() -> None:
        for i in range(total):
            output.offer(log.makeRecord(log.name, logging.INFO, __file__, 0, "line %05d %s", (i, "." * 80),
                                        None))

    offering = threading.Thread(target=offer_all)
    t0 = time.monotonic()
    offering.start()
    offering.join(20)
    assert not offering.is_alive(), "offer() blocked on an output nobody reads"
    took = time.monotonic() - t0
    assert took < 10, f"{total} offers took {took:.1f} s"
    assert output.dropped > 0
    wait_for(output.stalled, timeout=5, what="the writer to be seen stuck")

    # Now read: every line is there or counted, and each count sits where its gap is.
    text = b""
    deadline = time.monotonic() + 20
    numbers: list[int] = []
    drops: list[tuple[int, int]] = []  # (index in numbers where the gap is, count)
    while time.monotonic() < deadline:
        text += read_available(read, 0.2)
        numbers, drops = [], []
        for line in text.splitlines():
            if m := re.search(rb"line (\d{5})", line):
                numbers.append(int(m.group(1)))
            elif m := DROPPED.search(line):
                drops.append((len(numbers), int(m.group(1))))
        if len(numbers) + sum(n for _, n in drops) == total:
            break
    assert len(numbers) + sum(n for _, n in drops) == total
    assert drops and sum(n for _, n in drops) == output.dropped
    expected = 0
    for i, number in enumerate(numbers):
        expected += sum(n for at, n in drops if at == i)
        assert number == expected, f"line {i}: {number}, expected {expected}"
        expected += 1
    output.stop()
    assert output.wait_idle(time.monotonic() + 5)
    output.close()
    os.close(read)


def test_a_reader_that_goes_away_ends_the_output_not_the_caller() -> None:
    read, write = os.pipe()
    output = LogOutput("console", Console(write), TextFormatter(CONSOLE_TIME))
    os.close(write)
    log = logging.getLogger("test.gone")
    output.offer(log.makeRecord(log.name, logging.INFO, __file__, 0, "before", (), None))
    assert output.wait_idle(time.monotonic() + 5)
    assert read_available(read, 1.0).endswith(b"before\n")
    os.close(read)  # `streamnode run | head -1`: the reader is gone for good
    for i in range(2000):
        output.offer(log.makeRecord(log.name, logging.INFO, __file__, 0, "after %d", (i,), None))
    assert output.wait_idle(time.monotonic() + 5)  # nothing left to wait for, nothing raised
    output.stop()
    output.close()


class FillingDisk:
    """A file on a disk that is full for a while (ENOSPC), then has room again."""

    where = "node.log"
    stuck_reason = "node.log could not keep up"

    def __init__(self) -> None:
        self.full = True
        self.data = b""

    def write(self, data: bytes) -> None:
        if self.full:
            raise OSError(28, "No space left on device")
        self.data += data

    def close(self) -> None:
        pass


def test_lines_a_full_disk_refused_are_counted_once_it_has_room() -> None:
    disk = FillingDisk()
    output = LogOutput("file", disk, TextFormatter(CONSOLE_TIME))
    log = logging.getLogger("test.disk")
    for i in range(5):
        output.offer(log.makeRecord(log.name, logging.INFO, __file__, 0, "line %d", (i,), None))
    wait_for(lambda: output.lost == 5, timeout=5, what="five lines lost")
    disk.full = False
    output.offer(log.makeRecord(log.name, logging.INFO, __file__, 0, "line 5", (), None))
    assert output.wait_idle(time.monotonic() + 5)
    lines = disk.data.decode().splitlines()
    assert lines[0].endswith("5 log lines lost: cannot write node.log: No space left on device")
    assert lines[1].endswith("line 5") and len(lines) == 2
    output.stop()
    output.close()


def test_the_log_file_rotates_between_lines_and_keeps_the_newest(tmp_path: Path) -> None:
    path = tmp_path / "node.log"
    output = LogOutput("file", RotatingFile(path, max_bytes=1000, backups=2), TextFormatter(CONSOLE_TIME))
    log = logging.getLogger("test.rotate")
    for i in range(200):
        output.offer(log.makeRecord(log.name, logging.INFO, __file__, 0, "line %03d", (i,), None))
    output.stop()
    assert output.wait_idle(time.monotonic() + 10)
    output.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node.log", "node.log.1", "node.log.2"]
    files = [path.with_name("node.log.2"), path.with_name("node.log.1"), path]
    assert all(p.stat().st_size <= 1000 for p in files)
    lines = [line for p in files for line in p.read_text().splitlines()]
    numbers = [int(re.search(r"line (\d{3})$", line).group(1)) for line in lines]  # whole lines only
    assert numbers == list(range(numbers[0], 200)) and numbers[0] > 0  # the newest, in order


def test_json_lines_carry_the_traceback_and_logging_is_restored(tmp_path: Path) -> None:
    path = tmp_path / "node.log"
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    logs = start_logging("debug", "json", file=path, console=False, capture_stdio=False)
    try:
        raise ValueError("bad value")
    except ValueError:
        logging.getLogger("test.json").exception("prompt %r failed", "café ☕")
    logs.close()
    assert root.handlers == handlers and root.level == level
    (record,) = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert record["level"] == "ERROR" and record["logger"] == "test.json"
    assert record["message"] == "prompt 'café ☕' failed"
    assert "ValueError: bad value" in record["exception"] and "Traceback" in record["exception"]


# -- the kits' launcher, run as documented ----------------------------------------------------------

KIT_READMES = [ROOT / "touchdesigner" / "README.md", ROOT / "obs" / "README.md"]


def launcher_code(readme: Path) -> str:
    section = readme.read_text(encoding="utf-8").split("### Starting the node from a script", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", section.split("\n## ", 1)[0], re.S)
    (code,) = [b for b in blocks if "def start_streamnode" in b]
    return code


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="checks the segment file under /dev/shm")
def test_the_kits_start_the_node_so_that_nothing_can_block(tmp_path: Path) -> None:
    codes = {launcher_code(readme) for readme in KIT_READMES}
    assert len(codes) == 1, "the TouchDesigner and OBS kits document different launchers"
    scope: dict = {}
    exec(codes.pop(), scope)  # noqa: S102 - the documented launcher, as a user copies it
    streamnode = Path(sys.executable).with_name("streamnode")
    if not streamnode.exists():
        pytest.skip("the streamnode command is not installed beside this Python (pip install -e .)")
    name = f"sn_kit{uuid.uuid4().hex[:8]}"
    log = tmp_path / "streamnode.log"
    node = scope["start_streamnode"](str(streamnode), [
        "--engine", "passthrough", "--source", "test://moving?fps=60", "--sink", f"shm://{name}",
        "--width", "64", "--height", "64", "--no-osc"], str(log))
    try:
        wait_for(lambda: node.poll() is not None or (log.exists() and "first frame" in log.read_text()),
                 timeout=60, what="the node streaming", step=0.1)
        assert node.poll() is None, log.read_text()
        assert Path("/dev/shm", name).exists()
        t0 = time.monotonic()
        node.terminate()
        rc = node.wait(timeout=10)
        took = time.monotonic() - t0
    finally:
        if node.poll() is None:
            node.kill()
            node.wait()
    text = log.read_text()
    assert rc == 0 and took < 2.0, (rc, took, text[-2000:])
    assert not Path("/dev/shm", name).exists()
    assert "SIGTERM: shutting down" in text and re.search(r"^streamnode: \d+ frames out", text, re.M)
