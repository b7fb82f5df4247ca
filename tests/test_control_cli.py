"""`streamnode osc ADDRESS [ARGS...]`: typing of arguments, sending, and waiting for replies."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from support import free_udp_port

from streamnode.config import OscConfig
from streamnode.control.osc import OscServer
from streamnode.control.osc_cli import add_osc_arguments, osc_command, typed_args
from streamnode.control.updates import ControlQueue

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def node():
    """A server replying to a free port (the CLI's --reply-port) and an engine thread."""
    reply_port = free_udp_port()
    queue = ControlQueue()
    server = OscServer(OscConfig(port=0, reply_port=reply_port), queue)
    server.start()
    applied: dict[str, Any] = {}
    stop = threading.Event()

    def engine(stop: threading.Event) -> None:
        while not stop.wait(0.005):
            for u in queue.drain():
                applied[u.key] = u.value
                queue.applied(u)

    t = threading.Thread(target=engine, args=(stop,), name="cli-test-engine", daemon=True)
    t.start()
    yield server, applied, reply_port
    stop.set()
    t.join(2)
    server.stop()


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="streamnode osc")
    add_osc_arguments(parser)
    return osc_command(parser.parse_args(argv))


def test_typed_args() -> None:
    assert typed_args(["a cat", "1", "-2", "0.5", "-.5", "1e3", "nan", "3000000000"]) == [
        ("s", "a cat"), ("i", 1), ("i", -2), ("f", 0.5), ("f", -0.5), ("f", 1000.0), ("s", "nan"),
        ("h", 3_000_000_000)]
    assert typed_args(["42", "1", "nan"], "sfd")[0] == ("s", "42")
    assert typed_args(["1"], "T") == [("T", True)]
    with pytest.raises(ValueError, match="2 tags for 1 arguments"):
        typed_args(["1"], "ii")


def test_prompt_from_the_command_line_as_a_user_types_it(node) -> None:
    server, applied, reply_port = node
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "streamnode.control.osc_cli", "/prompt", "a cat", "--port", str(server.port),
         "--wait-reply", "1", "--reply-port", str(reply_port)],
        capture_output=True, text=True, timeout=30, env=env,
    )
    assert out.returncode == 0, out.stderr
    assert "/streamnode/applied/prompt 'a cat'" in out.stdout
    assert applied["prompt"] == "a cat"


def test_numbers_negative_numbers_and_forced_types(node, capsys) -> None:
    server, applied, reply_port = node
    port = ["--port", str(server.port), "--reply-port", str(reply_port), "--wait-reply", "0.5"]
    assert run_cli(["/t_index", "20", "35", "45", *port]) == 0
    assert applied["t_index_list"] == [20, 35, 45]
    assert run_cli(["--types", "s", "/prompt", "42", *port]) == 0
    assert applied["prompt"] == "42"
    assert run_cli([*port, "/negative_prompt", "--", "-dark"]) == 0
    assert applied["negative_prompt"] == "-dark"
    capsys.readouterr()
    assert run_cli(["/guidance", "-1", *port]) == 1  # a negative number is an argument, not a flag
    assert "/streamnode/error '/guidance: -1.0 is out of range 0..20'" in capsys.readouterr().out
    assert run_cli(["/guidance", "2", "--port", str(server.port)]) == 0  # fire and forget


def test_bad_input_and_no_reply(capsys) -> None:
    assert run_cli(["prompt", "x"]) == 2
    assert "not an OSC address" in capsys.readouterr().out
    assert run_cli(["--types", "q", "/prompt", "x"]) == 2
    nobody = free_udp_port()
    assert run_cli(["/prompt", "x", "--port", str(nobody), "--reply-port", str(free_udp_port()),
                    "--wait-reply", "0.2"]) == 3
