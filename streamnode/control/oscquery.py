"""OSCQuery: the OSC address tree, with types, ranges and live values, served as JSON over HTTP.

Clients that speak OSCQuery (Chataigne, ossia score, TouchDesigner community components) fetch
`GET /` for the whole tree, `GET /guidance` for one node, `GET /guidance?VALUE` for one
attribute and `GET /?HOST_INFO` for where to send OSC. Each request builds the tree afresh
from the OSC server's current values, so values follow live changes; there is no websocket
(`LISTEN` is advertised as unsupported, clients poll). mDNS announcement (`_oscjson._tcp`)
only when asked for and `zeroconf` is installed.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

logger = logging.getLogger(__name__)

ATTRIBUTES = ("FULL_PATH", "CONTENTS", "TYPE", "VALUE", "RANGE", "ACCESS", "DESCRIPTION")
"""Attributes a `?ATTR` query may ask for; others get 400 as the OSCQuery spec says."""

NodesFn = Callable[[], list[dict[str, Any]]]


def build_tree(nodes: list[dict[str, Any]], description: str = "") -> dict[str, Any]:
    """Flat method descriptions (each with FULL_PATH) → the nested OSCQuery tree.

    Containers are made for every path step; a method may also be a container
    (`/prompt` and `/prompt/blend`), which OSCQuery allows.
    """
    root: dict[str, Any] = {"FULL_PATH": "/", "ACCESS": 0, "DESCRIPTION": description, "CONTENTS": {}}
    for node in nodes:
        parts = [p for p in node["FULL_PATH"].split("/") if p]
        here = root
        for i, part in enumerate(parts):
            contents = here.setdefault("CONTENTS", {})
            child = contents.get(part)
            if child is None:
                child = {"FULL_PATH": "/" + "/".join(parts[: i + 1]), "ACCESS": 0}
                contents[part] = child
            here = child
        contents_kept = here.get("CONTENTS")
        here.update(node)
        if contents_kept is not None:
            here["CONTENTS"] = contents_kept
    return root


def find_node(tree: dict[str, Any], path: str) -> dict[str, Any] | None:
    here: dict[str, Any] | None = tree
    for part in (p for p in path.split("/") if p):
        here = (here or {}).get("CONTENTS", {}).get(part)
        if here is None:
            return None
    return here


class _Handler(BaseHTTPRequestHandler):
    server: _HttpServer
    server_version = "streamnode-oscquery"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        owner = self.server.owner
        if not owner.allowed(self.client_address[0]):
            self._reply(HTTPStatus.FORBIDDEN, {"error": "not in --osc-allow"})
            return
        url = urlsplit(self.path)
        path, query = unquote(url.path) or "/", url.query
        try:
            if query == "HOST_INFO":
                self._reply(HTTPStatus.OK, owner.host_info())
                return
            node = find_node(build_tree(owner.nodes(), owner.name), path)
        except Exception:  # a bug in describing the tree must not kill the HTTP thread
            logger.exception("OSCQuery: cannot describe %s", path)
            self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error"})
            return
        if node is None:
            self._reply(HTTPStatus.NOT_FOUND, {"error": f"no OSC address {path}"})
        elif not query:
            self._reply(HTTPStatus.OK, node)
        elif query not in ATTRIBUTES:
            self._reply(HTTPStatus.BAD_REQUEST, {"error": f"unknown attribute {query[:40]}"})
        elif query not in node:
            self._reply(HTTPStatus.NO_CONTENT, None)
        else:
            self._reply(HTTPStatus.OK, {query: node[query]})

    def _reply(self, status: HTTPStatus, body: Any) -> None:
        data = b"" if body is None else json.dumps(body, allow_nan=False).encode("utf-8")
        self.send_response(status)
        if body is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Access-Control-Allow-Origin", "*")  # browser-based clients
        self.end_headers()
        if data:
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        logger.debug("OSCQuery %s: " + format, self.client_address[0], *args)


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    owner: OscQueryServer

    def __init__(self, address: tuple[str, int], owner: OscQueryServer) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.owner = owner
        super().__init__(address, _Handler)


class OscQueryServer:
    """HTTP OSCQuery server on its own named thread. `start()` binds (raises OSError);
    `stop(timeout)` shuts it down; both safe twice."""

    def __init__(
        self,
        host: str,
        port: int,
        nodes: NodesFn,
        host_info: Callable[[], dict[str, Any]],
        *,
        allowed: Callable[[str], bool] | None = None,
        mdns: bool = False,
        name: str = "streamnode",
    ) -> None:
        self.host, self._port = host, port
        self.nodes, self.host_info = nodes, host_info
        self.allowed = allowed or (lambda _host: True)
        self.mdns = mdns
        self.name = name
        self._http: _HttpServer | None = None
        self._thread: threading.Thread | None = None
        self._zeroconf: Any = None
        self._services: list[Any] = []

    @property
    def port(self) -> int:
        return int(self._http.server_address[1]) if self._http is not None else self._port

    def start(self) -> None:
        if self._http is not None:
            return
        self._http = _HttpServer((self.host, self._port), self)
        self._thread = threading.Thread(
            target=self._http.serve_forever, kwargs={"poll_interval": 0.05}, name="oscquery-http", daemon=True
        )
        self._thread.start()
        if self.mdns:
            self._announce()

    def stop(self, timeout: float = 2.0) -> None:
        http, self._http = self._http, None
        if http is None:
            return
        if self._zeroconf is not None:
            try:
                for info in self._services:
                    self._zeroconf.unregister_service(info)
                self._zeroconf.close()
            except Exception as e:  # mDNS teardown must not block shutdown
                logger.warning("OSCQuery: mDNS teardown failed: %s", e)
            self._zeroconf = None
        http.shutdown()
        http.server_close()
        if self._thread is not None:
            self._thread.join(timeout)

    def _announce(self) -> None:
        try:
            from zeroconf import ServiceInfo, Zeroconf
        except ImportError:
            logger.warning("OSCQuery: mDNS announcement needs zeroconf: pip install 'streamnode[oscquery]'")
            return
        info = self.host_info()
        ip = self.host if self.host not in ("0.0.0.0", "::") else socket.gethostbyname(socket.gethostname())
        try:
            packed = socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)
            label = self.name.replace(".", "-")
            self._services = [
                ServiceInfo("_oscjson._tcp.local.", f"{label}._oscjson._tcp.local.", addresses=[packed],
                            port=self.port, properties={}),
                ServiceInfo("_osc._udp.local.", f"{label}._osc._udp.local.", addresses=[packed],
                            port=int(info["OSC_PORT"]), properties={}),
            ]
            self._zeroconf = Zeroconf()
            for service in self._services:
                self._zeroconf.register_service(service)
            logger.info("OSCQuery announced over mDNS as %r", label)
        except Exception as e:  # discovery is a convenience; the node works without it
            logger.warning("OSCQuery: mDNS announcement failed: %s", e)
