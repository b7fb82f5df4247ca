"""http:// — a small web page with the live output (MJPEG) and the node's metrics.

    --sink http://127.0.0.1:8080          open http://127.0.0.1:8080 in a browser
    --sink http://                        the same (loopback, port 8080)
    --sink "http://0.0.0.0:8080?fps=10"   visible to the whole network (a warning says so)

Routes: `/` the page, `/stream.mjpg` the live picture (multipart JPEG), `/frame.jpg` one
picture, `/status.json` the metrics. Frames are JPEG-encoded at most `fps` times a second and
only while someone watches, so an idle preview costs nothing.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import cv2
import numpy as np

from streamnode.frames import Frame
from streamnode.io.base import Transport, TransportError, TransportOptions, UriParams

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
BOUNDARY = "streamnodeframe"
# A viewer that asked for a picture this recently keeps the encoder running.
WATCH_WINDOW_S = 10.0

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>streamnode preview</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{margin:0;background:#111;color:#ddd;font:14px/1.4 system-ui,sans-serif;display:flex;flex-direction:column;align-items:center}
 img{max-width:100vw;max-height:85vh;image-rendering:auto;background:#000;margin-top:8px}
 table{border-collapse:collapse;margin:8px}td{padding:2px 10px}td:first-child{color:#888;text-align:right}
</style></head>
<body data-frames="0">
<img id="live" src="stream.mjpg" alt="live output"
     onload="document.body.dataset.frames = +document.body.dataset.frames + 1;
             document.body.dataset.width = this.naturalWidth">
<table id="stats"><tbody>
 <tr><td>state</td><td id="state">…</td></tr>
 <tr><td>fps in / out</td><td id="fps">…</td></tr>
 <tr><td>engine</td><td id="engine">…</td></tr>
 <tr><td>latency p50 / p95</td><td id="latency">…</td></tr>
 <tr><td>dropped / skipped</td><td id="drops">…</td></tr>
 <tr><td>frames out</td><td id="frames">…</td></tr>
 <tr><td>error</td><td id="error"></td></tr>
</tbody></table>
<script>
const $ = (id) => document.getElementById(id);
const n = (v, d = 1) => (typeof v === "number" ? v.toFixed(d) : "–");
async function poll() {
  try {
    const s = await (await fetch("status.json", {cache: "no-store"})).json();
    $("state").textContent = s.state ?? "–";
    $("fps").textContent = n(s.fps_in) + " / " + n(s.fps_out);
    $("engine").textContent = n(s.engine_ms) + " ms";
    $("latency").textContent = n(s.latency_ms_p50) + " / " + n(s.latency_ms_p95) + " ms";
    $("drops").textContent = (s.dropped ?? "–") + " / " + (s.skipped ?? "–");
    $("frames").textContent = s.frames_out ?? "–";
    $("error").textContent = s.error || "";
  } catch (e) { $("state").textContent = "node not answering"; }
}
poll(); setInterval(poll, 1000);
</script></body></html>
"""


class PreviewSink(Transport):
    """Serves the live output over HTTP from its own server thread."""

    def __init__(self, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *, fps: float = 15.0, quality: int = 80,
                 status: Callable[[], dict[str, Any]] | None = None, uri: str = "") -> None:
        self.uri = uri or f"http://{host}:{port}"
        self.host, self.port = host, port
        self.max_fps = fps
        self.quality = quality
        self.status = status
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._cond = threading.Condition()
        self._jpeg = b""
        self._jpeg_count = 0
        self._streams = 0
        self._wanted_until = 0.0
        self._next_encode = 0.0
        self._bgr: np.ndarray | None = None
        self._encode_params = [cv2.IMWRITE_JPEG_QUALITY, quality]

    @classmethod
    def from_uri(cls, uri: str, target: str, params: UriParams, options: TransportOptions) -> PreviewSink:
        host, port = DEFAULT_HOST, DEFAULT_PORT
        if target:
            address = target.rstrip("/")
            if address.startswith("["):  # [::1]:8080
                h, _, p = address[1:].partition("]")
                host, port_text = h, p.lstrip(":")
            else:
                h, _, port_text = address.rpartition(":") if ":" in address else (address, "", "")
                host = h or DEFAULT_HOST
            if port_text:
                if not port_text.isdigit() or not 0 <= int(port_text) < 65536:
                    raise TransportError(f"{uri}: {port_text!r} is not a port")
                port = int(port_text)
        fps = params.number("fps", 15.0, minimum=0.1)
        quality = params.integer("quality", 80, minimum=1)
        params.done()
        return cls(host, port, fps=fps, quality=min(quality, 100), status=options.status, uri=uri)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def open(self) -> None:
        self.close()
        self._stopping.clear()
        handler = type("Handler", (_Handler,), {"preview": self})
        server_class = ThreadingHTTPServer
        if ":" in self.host:
            server_class = type("Server6", (ThreadingHTTPServer,), {"address_family": socket.AF_INET6})
        try:
            server = server_class((self.host, self.port), handler)
        except OSError as e:
            raise TransportError(f"{self.uri}: cannot listen on {self.host}:{self.port}: {e.strerror or e}") from None
        server.daemon_threads = True  # a viewer that never reads must not hold up shutdown
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"preview-http:{self.port}", daemon=True)
        self._thread.start()
        if not _is_loopback(self.host):
            logger.warning("%s: the preview listens on %s: anyone on that network can watch", self.uri, self.host)
        logger.info("%s: preview at %s", self.uri, self.url)

    # -- called from the sink thread -----------------------------------------------------

    def send(self, frame: Frame) -> None:
        now = time.monotonic()
        if now < self._next_encode or (self._streams == 0 and now > self._wanted_until):
            return
        self._next_encode = now + 1.0 / self.max_fps
        image = frame.image
        if self._bgr is None or self._bgr.shape != image.shape:
            self._bgr = np.empty(image.shape, np.uint8)
        cv2.cvtColor(image, cv2.COLOR_RGB2BGR, dst=self._bgr)
        ok, jpeg = cv2.imencode(".jpg", self._bgr, self._encode_params)
        if not ok:
            raise OSError("JPEG encoding failed")
        with self._cond:
            self._jpeg = jpeg.tobytes()
            self._jpeg_count += 1
            self._cond.notify_all()

    # -- called from the HTTP threads ----------------------------------------------------

    def next_jpeg(self, after: int, timeout: float) -> tuple[int, bytes] | None:
        """Wait for a JPEG newer than number `after`; None on timeout or shutdown."""
        with self._cond:
            self._wanted_until = time.monotonic() + WATCH_WINDOW_S
            self._cond.wait_for(lambda: self._jpeg_count > after or self._stopping.is_set(), timeout)
            if self._stopping.is_set() or self._jpeg_count <= after:
                return None
            return self._jpeg_count, self._jpeg

    def stream_started(self, delta: int) -> None:
        with self._cond:
            self._streams += delta
            self._wanted_until = time.monotonic() + WATCH_WINDOW_S

    @property
    def jpeg_count(self) -> int:
        return self._jpeg_count

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def status_json(self) -> bytes:
        status = dict(self.status()) if self.status else {}
        status["preview"] = {"viewers": self._streams, "jpegs": self._jpeg_count}
        return json.dumps(status, default=str).encode()

    def close(self) -> None:
        server, self._server = self._server, None
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
            self._thread = None


class _Handler(BaseHTTPRequestHandler):
    preview: PreviewSink
    server_version = "streamnode-preview"
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            self._reply(HTTPStatus.OK, "text/html; charset=utf-8", PAGE.encode())
        elif path == "/status.json":
            self._reply(HTTPStatus.OK, "application/json", self.preview.status_json())
        elif path == "/frame.jpg":
            # A fresh picture if frames flow; else the last one (a paused node), if any.
            got = self.preview.next_jpeg(self.preview.jpeg_count, timeout=1.0) or self.preview.next_jpeg(0, 0.0)
            if got is None:
                self._reply(HTTPStatus.SERVICE_UNAVAILABLE, "text/plain", b"no frame yet\n")
            else:
                self._reply(HTTPStatus.OK, "image/jpeg", got[1])
        elif path == "/stream.mjpg":
            self._stream()
        else:
            self._reply(HTTPStatus.NOT_FOUND, "text/plain", b"not found\n")

    def _reply(self, status: HTTPStatus, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _stream(self) -> None:
        self.close_connection = True
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY}")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        preview = self.preview
        preview.stream_started(+1)
        count = 0
        try:
            while not preview.stopping:
                got = preview.next_jpeg(count, timeout=1.0)
                if got is None:
                    continue
                count, jpeg = got
                self.wfile.write(
                    f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n".encode()
                    + jpeg + b"\r\n"
                )
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # the viewer left
        finally:
            preview.stream_started(-1)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        logger.debug("%s - %s", self.address_string(), format % args)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
