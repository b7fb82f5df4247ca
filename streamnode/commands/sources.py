"""`streamnode sources`: the NDI senders, capture devices and Spout senders this machine sees."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from streamnode.io.base import TransportError
from streamnode.node import EXIT_OK


def add_sources_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ndi-discovery", metavar="ADDR[,ADDR]", default="",
                        help="extra NDI discovery addresses, e.g. 127.0.0.1")
    parser.add_argument("--wait", type=float, default=2.0, metavar="S", help="how long to listen for NDI senders")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def list_all_sources(ndi_discovery: tuple[str, ...] = (), wait_s: float = 2.0) -> dict[str, Any]:
    """What `streamnode sources` prints: {"ndi": [...], "webcam": [...], "spout": [...], "errors": {...}}."""
    found: dict[str, Any] = {"ndi": [], "webcam": [], "spout": [], "errors": {}}
    try:
        from streamnode.io import ndi

        found["ndi"] = [f"ndi://{name}" for name in ndi.list_sources(ndi_discovery, wait_s)]
    except TransportError as e:
        found["errors"]["ndi"] = str(e)
    from streamnode.io import webcam

    found["webcam"] = [f"{uri}  {desc}" for uri, desc in webcam.list_devices()]
    if sys.platform == "win32":
        try:
            from streamnode.io import spout

            found["spout"] = [f"spout://{name}" for name in spout.list_senders()]
        except TransportError as e:
            found["errors"]["spout"] = str(e)
    else:
        found["errors"]["spout"] = "Spout is Windows-only"
    return found


def sources_command(args: argparse.Namespace) -> int:
    discovery = tuple(a.strip() for a in (args.ndi_discovery or "").split(",") if a.strip())
    found = list_all_sources(discovery, args.wait)
    if args.json:
        print(json.dumps(found, indent=2))
        return EXIT_OK
    for kind, title in (("ndi", "NDI senders"), ("webcam", "capture devices"), ("spout", "Spout senders")):
        print(f"{title}:")
        for line in found[kind]:
            print(f"  {line}")
        if not found[kind]:
            print(f"  ({found['errors'].get(kind, 'none found')})")
    return EXIT_OK
