"""OSCQuery: the address tree over HTTP, and LISTEN / PATH_CHANGED over a websocket on the same port.

Clients that speak OSCQuery (Chataigne, ossia score, the TouchDesigner community component,
python-oscquery) fetch `GET /` for the whole tree, `GET /guidance` for one node,
`GET /guidance?VALUE` for one attribute and `GET /?HOST_INFO` for where to send OSC. The tree
is described afresh for each request (`oscquery_tree.py`), so values follow live changes.

A client may also open a websocket on the same port (`ws://host:port/`) and send, as text,
`{"COMMAND": "LISTEN", "DATA": "/guidance"}` (or `"IGNORE"`). From then on every applied change
of that method, or of any method under that container (`/brush`, `/` for all), comes to it as
a binary OSC message, starting with the current value. Every client receives
`{"COMMAND": "PATH_CHANGED", "DATA": path}` when a node's description changed (a brush came or
went: re-read that path).

Bounded, so that no client can hold up the node: at most `max_clients` websockets (more get
503); each client's outbox keeps one message per address, the newest (a slow client skips
intermediate values, it never builds a backlog); a send that cannot complete within
`send_timeout_s` drops that client; a vanished client is found by the keepalive ping.
`publish()`, called on the OSC sender thread, only fills those outboxes: each client's own
thread does the sending.

The websocket and HTTP protocol are `websockets`' (`pip install 'streamnode[oscquery]'`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote, urlsplit

from streamnode.log_limit import LogLimiter

logger = logging.getLogger(__name__)

ATTRIBUTES = ("FULL_PATH", "CONTENTS", "TYPE", "VALUE", "RANGE", "ACCESS", "DESCRIPTION")
"""Attributes a `?ATTR` query may ask for; others get 400 as the OSCQuery spec says."""

_POLL_S = 0.05  # how soon a client's LISTEN/IGNORE is read while nothing is sent to it
_PING_S = 10.0  # keepalive: a client that answers no ping for this long is gone
_CLOSE_S = 1.0
_MAX_COMMAND = 64 * 1024
_SEND_BUFFER = 256 * 1024  # a whole tree's worth of LISTEN values, several times over

DescribeFn = Callable[[str], "dict[str, Any] | None"]
CurrentFn = Callable[[str], "list[tuple[str, bytes]] | None"]


def _websockets() -> Any:
    try:
        import websockets.sync.server  # noqa: F401 (the submodule is what we use)
    except ImportError as e:
        raise ImportError(
            "OSCQuery (--oscquery-port) needs the websockets package: pip install 'streamnode[oscquery]'"
        ) from e
    import websockets

    return websockets


class _Quiet(logging.LoggerAdapter):  # type: ignore[type-arg]
    """websockets reports every connection and HTTP reply at INFO; for the node that is DEBUG."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        super().log(logging.DEBUG if level == logging.INFO else level, msg, *args, **kwargs)


class _Client:
    """One websocket client: what it listens to and its outbox (one message per key, newest wins,
    oldest first). `listening` is replaced whole, so the sender thread may read it unlocked."""

    def __init__(self, connection: Any, host: str) -> None:
        self.connection = connection
        self.host = host
        self.listening: frozenset[str] = frozenset()
        self._outbox: dict[str, bytes | str] = {}
        self._lock = threading.Lock()
        self.wake = threading.Event()

    def wants(self, address: str) -> bool:
        listening = self.listening
        if not listening:
            return False
        path = address
        while path:
            if path in listening:
                return True
            path = path.rpartition("/")[0]
        return "/" in listening

    def offer(self, key: str, message: bytes | str) -> None:
        with self._lock:
            self._outbox.pop(key, None)  # re-queued at the end: the order values were applied in
            self._outbox[key] = message
        self.wake.set()

    def take(self) -> list[bytes | str]:
        with self._lock:
            messages = list(self._outbox.values())
            self._outbox.clear()
        return messages


class OscQueryServer:
    """HTTP + websocket OSCQuery server on `host:port`, in threads of its own.

    `describe(path)` returns the node at `path` now, with everything under it (None if there is
    none); `current(path)` the current value of every method at or under `path` as (address, OSC
    message) pairs, None for an unknown path; `host_info()` the HOST_INFO object. `start()` binds
    (raises OSError, or ImportError naming the extra); `stop(timeout)` closes every connection
    and joins; both safe twice.
    """

    def __init__(
        self,
        host: str,
        port: int,
        describe: DescribeFn,
        host_info: Callable[[], dict[str, Any]],
        current: CurrentFn | None = None,
        *,
        allowed: Callable[[str], bool] | None = None,
        max_clients: int = 32,
        send_timeout_s: float = 5.0,
    ) -> None:
        self.host, self._port = host, port
        self.describe, self.host_info = describe, host_info
        self.current: CurrentFn = current or (lambda _path: None)
        self.allowed = allowed or (lambda _host: True)
        self.max_clients = max_clients
        self.send_timeout_s = send_timeout_s
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._clients: set[_Client] = set()
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._log_limit = LogLimiter(5.0)
        self.counters = {"http": 0, "websockets": 0, "refused": 0, "dropped": 0}

    @property
    def port(self) -> int:
        return int(self._server.socket.getsockname()[1]) if self._server is not None else self._port

    @property
    def clients(self) -> int:
        """Websocket clients connected now."""
        return len(self._clients)

    def start(self) -> None:
        if self._server is not None:
            return
        ws = _websockets()
        timeout = self.send_timeout_s

        def connection(sock: socket.socket, *args: Any, **kwargs: Any) -> Any:
            # A send (or an HTTP reply) the client does not take within the timeout fails, and
            # the connection with it: a stalled client costs one thread for that long, no more,
            # and the kernel holds at most _SEND_BUFFER of what it did not read.
            sock.settimeout(timeout)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SEND_BUFFER)
            return ws.sync.server.ServerConnection(sock, *args, **kwargs)

        self._closing.clear()
        self._server = ws.sync.server.serve(
            self._serve_client, self.host, self._port,
            family=socket.AF_INET6 if ":" in self.host else socket.AF_INET,
            process_request=self._process_request, create_connection=connection,
            compression=None, max_size=_MAX_COMMAND, ping_interval=_PING_S, ping_timeout=_PING_S,
            close_timeout=_CLOSE_S, server_header="streamnode-oscquery", logger=_Quiet(logger, {}),
        )
        self._thread = threading.Thread(target=self._server.serve_forever, name="oscquery-http", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._closing.set()  # client loops end within _POLL_S; their connections close
        closer = threading.Thread(target=server.shutdown, name="oscquery-close", daemon=True)
        closer.start()
        closer.join(timeout)
        if closer.is_alive():  # a client that answers no close frame: cut it
            with self._lock:
                clients = list(self._clients)
            for client in clients:
                with contextlib.suppress(OSError):
                    client.connection.socket.shutdown(socket.SHUT_RDWR)  # ends a send blocked on it
                client.connection.close_socket()
            closer.join(1.0)
        if self._thread is not None:
            self._thread.join(1.0)

    # -- publishing (the OSC sender thread)

    def publish(self, values: Iterable[tuple[str, bytes]], paths: Iterable[str] = ()) -> None:
        """Hand each client the changes it listens to, and every client each changed path.
        Never blocks on a client."""
        with self._lock:
            clients = list(self._clients)
        if not clients:
            return
        notes = [(path, json.dumps({"COMMAND": "PATH_CHANGED", "DATA": path})) for path in paths]
        values = list(values)
        for client in clients:
            for path, note in notes:
                client.offer("P" + path, note)
            for address, message in values:
                if client.wants(address):
                    client.offer("V" + address, message)

    # -- HTTP (a thread per connection)

    def _process_request(self, connection: Any, request: Any) -> Any:
        host = str(connection.remote_address[0])
        if not self.allowed(host):
            self.counters["refused"] += 1
            return _response(HTTPStatus.FORBIDDEN, {"error": "not in --osc-allow"})
        if request.headers.get("Upgrade", "").lower() == "websocket":
            if len(self._clients) >= self.max_clients:
                self.counters["refused"] += 1
                self._log("full", "OSCQuery: refused a websocket from %s: %d clients already", host, self.max_clients)
                return _response(HTTPStatus.SERVICE_UNAVAILABLE, {"error": f"at most {self.max_clients} clients"})
            return None  # go on with the websocket handshake
        self.counters["http"] += 1
        url = urlsplit(request.path)
        path, query = unquote(url.path) or "/", url.query
        try:
            if query == "HOST_INFO":
                return _response(HTTPStatus.OK, self.host_info())
            node = self.describe(path)
        except Exception:  # a bug in describing the tree must not kill the server
            logger.exception("OSCQuery: cannot describe %s", path)
            return _response(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error"})
        if node is None:
            return _response(HTTPStatus.NOT_FOUND, {"error": f"no OSC address {path[:200]}"})
        if not query:
            return _response(HTTPStatus.OK, node)
        if query not in ATTRIBUTES:
            return _response(HTTPStatus.BAD_REQUEST, {"error": f"unknown attribute {query[:40]}"})
        if query not in node:
            return _response(HTTPStatus.NO_CONTENT, None)
        return _response(HTTPStatus.OK, {query: node[query]})

    # -- websocket clients (a thread each)

    def _serve_client(self, connection: Any) -> None:
        ws = _websockets()
        host, port = connection.remote_address[:2]
        threading.current_thread().name = f"oscquery-ws {host}:{port}"
        client = _Client(connection, str(host))
        with self._lock:
            self._clients.add(client)
        self.counters["websockets"] += 1
        logger.info("OSCQuery: websocket client %s:%s connected (%d now)", host, port, len(self._clients))
        reason = "closed"
        try:
            while not self._closing.is_set():
                client.wake.wait(_POLL_S)
                client.wake.clear()
                while True:
                    try:
                        command = connection.recv(timeout=0)
                    except TimeoutError:
                        break
                    self._on_command(client, command)
                for message in client.take():
                    connection.send(message)
        except ws.exceptions.ConnectionClosed as e:
            if isinstance(e.__cause__, TimeoutError) or "timed out" in str(e.__cause__ or ""):
                reason = f"dropped: it took no data for {self.send_timeout_s:g} s"
                self.counters["dropped"] += 1
            elif e.rcvd is None and e.sent is None:
                reason = "gone"
        finally:
            with self._lock:
                self._clients.discard(client)
            logger.info("OSCQuery: websocket client %s:%s %s (%d left)", host, port, reason, len(self._clients))

    def _on_command(self, client: _Client, command: str | bytes) -> None:
        if isinstance(command, bytes):
            self._log(f"binary:{client.host}", "OSCQuery: %s sent OSC over the websocket; send OSC over UDP to "
                      "OSC_PORT (HOST_INFO)", client.host)
            return
        try:
            message = json.loads(command)
            verb, path = message["COMMAND"], message["DATA"]
            if verb not in ("LISTEN", "IGNORE") or not isinstance(path, str) or not path.startswith("/"):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            self._log(f"command:{client.host}", "OSCQuery: %s sent %r; expected {\"COMMAND\": \"LISTEN\" or "
                      "\"IGNORE\", \"DATA\": \"/path\"}", client.host, command[:200])
            return
        path = path.rstrip("/") or "/"
        if verb == "IGNORE":
            client.listening = client.listening - {path}
            return
        try:
            now = self.current(path)
        except Exception:
            logger.exception("OSCQuery: cannot read %s", path)
            return
        if now is None:
            self._log(f"listen:{client.host}", "OSCQuery: %s asked to LISTEN to %s: no such address",
                      client.host, path[:200])
            return
        client.listening = client.listening | {path}
        for address, message_bytes in now:  # the value now, so a client never misses one between GET and LISTEN
            client.offer("V" + address, message_bytes)

    def _log(self, key: str, msg: str, *args: Any) -> None:
        suppressed = self._log_limit(key)
        if suppressed is None:
            return
        if suppressed:
            msg, args = msg + " (%d more like it suppressed)", (*args, suppressed)
        logger.warning(msg, *args)


def _response(status: HTTPStatus, body: Any) -> Any:
    from websockets.datastructures import Headers
    from websockets.http11 import Response

    data = b"" if body is None else json.dumps(body, allow_nan=False).encode("utf-8")
    headers = Headers()
    if body is not None:
        headers["Content-Type"] = "application/json"
    headers["Content-Length"] = str(len(data))
    headers["Access-Control-Allow-Origin"] = "*"  # browser-based clients
    headers["Connection"] = "close"
    return Response(status.value, status.phrase, headers, data)
