"""`streamnode osc ADDRESS [ARGS...]`: typing of arguments, sending, and waiting for replies."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import free_udp_port, small_config, tiny_factory, wait_for

from streamnode.control.osc_cli import add_osc_arguments, osc_command, typed_args
from streamnode.node import Node

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def node(components):  # noqa: ANN001, ANN201
    """A real node (the tiny model) whose OSC server replies to a free port (the CLI's --reply-port)."""
    reply_port = free_udp_port()
    running = Node(small_config(**{"osc.enabled": True, "osc.port": 0, "osc.reply_port": reply_port}),
                   engine_factory=tiny_factory(components))
    running.start()
    wait_for(lambda: running.status()["state"] == "streaming", timeout=30, what="streaming")
    yield running, reply_port
    running.stop()


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
    running, reply_port = node
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "streamnode.control.osc_cli", "/prompt", "a cat", "--port", str(running.osc_port),
         "--wait-reply", "1", "--reply-port", str(reply_port)],
        capture_output=True, text=True, timeout=30, env=env,
    )
    assert out.returncode == 0, out.stderr
    assert "/streamnode/applied/prompt 'a cat'" in out.stdout
    assert running.live().params.prompt == "a cat"


def test_numbers_negative_numbers_and_forced_types(node, capsys) -> None:
    running, reply_port = node
    port = ["--port", str(running.osc_port), "--reply-port", str(reply_port), "--wait-reply", "1"]
    params = lambda: running.live().params  # noqa: E731
    assert run_cli(["/t_index", "20", "35", "45", *port]) == 0
    assert params().t_index_list == (20, 35, 45)
    assert run_cli(["--types", "s", "/prompt", "42", *port]) == 0
    assert params().prompt == "42"
    assert run_cli([*port, "/negative_prompt", "--", "-dark"]) == 0
    assert params().negative_prompt == "-dark"
    capsys.readouterr()
    assert run_cli(["/guidance", "-1", *port]) == 1  # a negative number is an argument, not a flag
    assert "/streamnode/error '/guidance: -1.0 is out of range 0..20'" in capsys.readouterr().out
    assert run_cli(["/guidance", "2", "--port", str(running.osc_port)]) == 0  # fire and forget


def test_bad_input_and_no_reply(capsys) -> None:
    assert run_cli(["prompt", "x"]) == 2
    assert "not an OSC address" in capsys.readouterr().out
    assert run_cli(["--types", "q", "/prompt", "x"]) == 2
    nobody = free_udp_port()
    assert run_cli(["/prompt", "x", "--port", str(nobody), "--reply-port", str(free_udp_port()),
                    "--wait-reply", "0.2"]) == 3
