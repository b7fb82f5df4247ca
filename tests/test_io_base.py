"""The URI registry, URI parameters, missing-package errors and the retry policy."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest

from streamnode.io import base
from streamnode.io.base import (
    Retry,
    Sink,
    Source,
    TransportError,
    TransportOptions,
    TransportUnavailable,
    create_sink,
    create_source,
    open_source,
    parse_uri,
    register_sink,
    register_source,
    sink_schemes,
    source_schemes,
)
from streamnode.io.null import NullSink


def test_parse_uri_keeps_the_target_verbatim() -> None:
    assert parse_uri("ndi://STAGE PC (Cam 1)") == ("ndi", "STAGE PC (Cam 1)", {})
    assert parse_uri("test://bars?size=64x32&fps=10") == ("test", "bars", {"size": "64x32", "fps": "10"})
    assert parse_uri("file:///abs/clip.mp4") == ("file", "/abs/clip.mp4", {})
    assert parse_uri("vcam://") == ("vcam", "", {})
    with pytest.raises(TransportError, match="scheme://target"):
        parse_uri("clip.mp4")


def test_unknown_scheme_lists_the_known_ones() -> None:
    with pytest.raises(TransportError, match=r"no source for rtsp://; sources: .*ndi://.*test://"):
        create_source("rtsp://cam")
    with pytest.raises(TransportError, match=r"no sink for webcam://.*vcam://"):
        create_sink("webcam://0")


def test_unknown_and_bad_parameters_say_what_is_allowed() -> None:
    with pytest.raises(TransportError, match="unknown parameter colour; allowed: size, fps, seed"):
        create_source("test://bars?colour=red")
    with pytest.raises(TransportError, match="size='big' must read WIDTHxHEIGHT"):
        create_source("test://bars?size=big")
    with pytest.raises(TransportError, match="fps='-3' must be a number"):
        create_source("test://bars?fps=-3")
    with pytest.raises(TransportError, match="unknown pattern"):
        create_source("test://plaid")


def test_every_scheme_of_the_issue_is_registered() -> None:
    assert {"test", "file", "webcam", "ndi", "spout", "shm"} <= set(source_schemes())
    assert {"null", "file", "ndi", "spout", "shm", "vcam", "http"} <= set(sink_schemes())


def test_register_custom_transports() -> None:
    class Still:
        fps = None

        def __init__(self, uri: str) -> None:
            self.uri = uri

        @classmethod
        def from_uri(cls, uri, target, params, options):  # noqa: ANN001, ANN206
            params.done()
            return cls(uri)

        def open(self) -> None: ...

        def read(self, timeout: float) -> np.ndarray:
            return np.zeros((4, 4, 3), np.uint8)

        def close(self) -> None: ...

    register_source("still", Still)
    register_sink("devnull", NullSink)
    try:
        source = open_source("still://x")
        assert isinstance(source, Source) and source.read(0).shape == (4, 4, 3)
        assert isinstance(create_sink("devnull://"), Sink)
    finally:
        base._SOURCES.pop("still")
        base._SINKS.pop("devnull")


def test_a_missing_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "NDIlib", None)  # import NDIlib → ImportError
    with pytest.raises(TransportUnavailable, match=r'ndi-python package .*pip install "streamnode\[ndi\]"'):
        create_source("ndi://Studio")
    monkeypatch.setitem(sys.modules, "pyvirtualcam", None)
    with pytest.raises(TransportUnavailable, match=r'pip install "streamnode\[vcam\]"'):
        create_sink("vcam://")


@pytest.mark.skipif(sys.platform == "win32", reason="the error path of non-Windows systems")
def test_spout_elsewhere_is_a_clear_error() -> None:
    for make in (create_source, create_sink):
        with pytest.raises(TransportUnavailable, match=r"Windows only.*ndi:// or shm://"):
            make("spout://TD")


def test_retry_logs_once_per_outage_and_backs_off(caplog: pytest.LogCaptureFixture) -> None:
    retry = Retry("source x", first=0.1, longest=0.4)
    with caplog.at_level(logging.DEBUG, logger="streamnode.io.base"):
        for _ in range(6):
            retry.failed(OSError("gone"))
        retry.failed(OSError("other"))
        assert retry.wait_s() <= 0.4
        retry.succeeded()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["source x: gone; retrying", "source x: other (still retrying)"]
    assert any("back after" in r.getMessage() for r in caplog.records)
    assert not retry.failing and retry.ready()


def test_options_default_to_a_loopback_free_setup() -> None:
    options = TransportOptions()
    assert options.realtime and options.loop and options.ndi_discovery == ()
