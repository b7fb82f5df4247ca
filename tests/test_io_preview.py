"""http:// web preview: the page, one MJPEG frame and the metrics over HTTP, and (where Debian's
chromium is installed, as in CI) a headless browser that shows the picture."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from streamnode.frames import Frame
from streamnode.io.base import TransportError, TransportOptions, create_sink, open_sink
from streamnode.io.preview import BOUNDARY, PreviewSink

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@pytest.fixture
def preview() -> Iterator[PreviewSink]:
    status = {"state": "streaming", "fps_in": 30.0, "fps_out": 29.5, "latency_ms_p50": 12.0,
              "latency_ms_p95": 20.0, "dropped": 3, "skipped": 4, "frames_out": 99, "error": ""}
    sink = open_sink("http://127.0.0.1:0?fps=60", TransportOptions(width=64, height=48, status=lambda: status))
    stop = threading.Event()
    image = np.zeros((48, 64, 3), np.uint8)
    image[:, :, 0] = 255  # pure red

    def feed() -> None:  # the node's sink thread, in short
        while not stop.wait(1 / 60):
            sink.send(Frame(image, 1, time.monotonic_ns()))

    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    yield sink
    stop.set()
    thread.join(2)
    sink.close()


def get(url: str, timeout: float = 5.0) -> tuple[str, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - loopback only
        return r.headers["Content-Type"], r.read()


def test_loopback_by_default() -> None:
    sink = create_sink("http://")
    assert (sink.host, sink.port) == ("127.0.0.1", 8080)
    sink = create_sink("http://[::1]:9000")
    assert (sink.host, sink.port) == ("::1", 9000)
    with pytest.raises(TransportError, match="not a port"):
        create_sink("http://127.0.0.1:http")


def test_page_status_and_one_frame(preview: PreviewSink) -> None:
    ctype, page = get(preview.url)
    assert ctype.startswith("text/html") and b'src="stream.mjpg"' in page
    ctype, body = get(preview.url + "status.json")
    status = json.loads(body)
    assert ctype == "application/json" and status["fps_out"] == 29.5 and status["dropped"] == 3
    ctype, jpeg = get(preview.url + "frame.jpg")
    img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert ctype == "image/jpeg" and img.shape == (48, 64, 3)
    assert img[..., 2].mean() > 240 and img[..., 0].mean() < 15  # red (OpenCV decodes to BGR)


def test_mjpeg_stream_delivers_frames(preview: PreviewSink) -> None:
    with urllib.request.urlopen(preview.url + "stream.mjpg", timeout=5) as r:  # noqa: S310
        assert r.headers["Content-Type"] == f"multipart/x-mixed-replace; boundary={BOUNDARY}"
        jpegs = []
        buf = b""
        while len(jpegs) < 2:
            buf += r.read1(65536)
            while (start := buf.find(b"\r\n\r\n")) >= 0 and b"Content-Length" in buf[:start]:
                length = int(buf[:start].split(b"Content-Length: ")[1].split(b"\r\n")[0])
                if len(buf) < start + 4 + length:
                    break
                jpegs.append(buf[start + 4 : start + 4 + length])
                buf = buf[start + 4 + length :]
    img = cv2.imdecode(np.frombuffer(jpegs[-1], np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (48, 64, 3)


def test_unknown_path_is_404_and_close_is_quick(preview: PreviewSink) -> None:
    with pytest.raises(urllib.error.HTTPError) as err:
        get(preview.url + "nope")
    assert err.value.code == 404
    t0 = time.perf_counter()
    preview.close()
    preview.close()
    assert time.perf_counter() - t0 < 1.5


def test_port_in_use_is_a_clear_error(preview: PreviewSink) -> None:
    with pytest.raises(TransportError, match="cannot listen"):
        open_sink(f"http://127.0.0.1:{preview.port}")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (CI: apt-get install chromium)")
def test_headless_chromium_renders_the_live_picture(preview: PreviewSink) -> None:
    with tempfile.TemporaryDirectory() as profile:
        out = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-default-apps", "--disable-extensions", f"--user-data-dir={profile}",
             "--virtual-time-budget=3000", "--dump-dom", preview.url],
            capture_output=True, text=True, timeout=60,
        )
    dom = out.stdout
    assert "<body" in dom, out.stderr[-2000:]
    body = dom[dom.index("<body") : dom.index(">", dom.index("<body"))]
    # The <img>'s onload ran: the browser decoded an MJPEG frame 64 pixels wide.
    assert 'data-width="64"' in body, body
    assert 'id="state">streaming<' in dom  # and the metrics script ran
