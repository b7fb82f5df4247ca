"""`streamnode osc ADDRESS [ARGS...]`: send one OSC message from the command line.

    streamnode osc /prompt "a cat in the rain"
    streamnode osc /guidance 1.4
    streamnode osc /t_index 20 35 45
    streamnode osc /seed/blend 1 0.5 2 0.5
    streamnode osc --types s /prompt 42          # force a string that looks like a number
    streamnode osc /prompt -- "-dark"            # `--` before arguments that start with '-'
    streamnode osc /status --wait-reply 1        # print what the node answers

Arguments are typed like a surface would send them: integers → i, decimals → f, anything
else → s. Integers beyond 32 bits go as h (int64).
"""

from __future__ import annotations

import argparse
import re
import socket
import time
from typing import Any

from pythonosc.osc_message import OscMessage
from pythonosc.osc_message_builder import OscMessageBuilder

_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?")


def add_osc_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("address", help="OSC address, e.g. /prompt or /vj1/guidance")
    parser.add_argument("args", nargs="*", help="arguments: ints → i, decimals → f, else s")
    parser.add_argument("--host", default="127.0.0.1", help="node host (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7000, help="node OSC port (default 7000)")
    parser.add_argument("--types", default=None, metavar="TAGS",
                        help="explicit OSC type tags, one per argument, e.g. sf (i, h, f, d, s, T, F)")
    parser.add_argument("--wait-reply", type=float, default=0.0, metavar="SECONDS",
                        help="print the node's replies until it echoes the value or this many seconds "
                        "pass (exit 1 on /streamnode/error, 3 on silence)")
    parser.add_argument("--reply-port", type=int, default=7001,
                        help="port the node replies to (its --osc-reply port; default 7001)")


def typed_args(args: list[str], types: str | None = None) -> list[tuple[str, Any]]:
    """Command-line words → (OSC tag, value). Raises ValueError naming the bad word."""
    if types is not None and len(types) != len(args):
        raise ValueError(f"--types {types!r} has {len(types)} tags for {len(args)} arguments")
    out: list[tuple[str, Any]] = []
    for i, word in enumerate(args):
        tag = types[i] if types is not None else None
        if tag is None:
            if _INT.fullmatch(word):
                value = int(word)
                out.append(("i" if -(2**31) <= value < 2**31 else "h", value))
            elif _FLOAT.fullmatch(word):
                out.append(("f", float(word)))
            else:
                out.append(("s", word))
        elif tag in "ih":
            out.append((tag, int(word)))
        elif tag in "fd":
            out.append((tag, float(word)))  # "nan" and "inf" allowed here on purpose
        elif tag == "s":
            out.append(("s", word))
        elif tag in "TF":
            out.append((tag, tag == "T"))
        else:
            raise ValueError(f"--types: unknown tag {tag!r} (use i, h, f, d, s, T, F)")
    return out


def build_message(address: str, args: list[tuple[str, Any]]) -> bytes:
    builder = OscMessageBuilder(address=address)
    for tag, value in args:
        builder.add_arg(value, tag)
    return builder.build().dgram


def osc_command(args: argparse.Namespace) -> int:
    """Send the message; with --wait-reply print replies until the node echoes the applied
    value, reports an error, or the time is up. 0 ok, 1 error reply, 2 bad input, 3 no reply."""
    if not args.address.startswith("/"):
        print(f"streamnode osc: {args.address!r} is not an OSC address (it starts with '/', e.g. /prompt)")
        return 2
    try:
        dgram = build_message(args.address, typed_args(list(args.args), args.types))
    except Exception as e:  # bad --types, a value out of int64, a string python-osc can't encode
        print(f"streamnode osc: {e}")
        return 2
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        if args.wait_reply > 0:
            try:
                # The node replies to the sender's host at its reply port: listen there, on
                # loopback only when the node is on this machine.
                local = args.host in ("127.0.0.1", "localhost", "::1")
                any_host = "::" if family == socket.AF_INET6 else "0.0.0.0"
                sock.bind((args.host if local else any_host, args.reply_port))
            except OSError as e:
                print(f"streamnode osc: cannot listen for replies on port {args.reply_port}: {e}; "
                      "use --reply-port (the node's --osc-reply port)")
                return 2
        sock.sendto(dgram, (args.host, args.port))
        if args.wait_reply <= 0:
            return 0
        deadline = time.monotonic() + args.wait_reply
        got = error = False
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data, _ = sock.recvfrom(65536)
            except TimeoutError:
                break
            try:
                msg = OscMessage(data)
            except Exception:
                continue
            got = True
            error |= msg.address.endswith("/streamnode/error") and bool(msg.params and msg.params[0])
            print(msg.address, *(repr(p) if isinstance(p, str) else p for p in msg.params))
            # The echo of what we sent (or an error) answers it; /status waits the full time.
            if error or msg.address.replace("/streamnode/applied", "", 1) == args.address:
                break
    if error:
        return 1
    return 0 if got else 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="streamnode osc", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_osc_arguments(parser)
    return osc_command(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
