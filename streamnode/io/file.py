"""file:// — video files and image-sequence folders, as a source and as a sink.

    file://clip.mp4              play a video (at its own rate), looping unless --once
    file://clip.mp4?fps=12       ... at another rate
    file://frames/               play the images of a folder in name order (at the node's rate)
    file://still.png             one image, repeated
    --sink file://out.mp4        write a video at the node's output rate (mp4v; .avi: MJPG)
    --sink file://out/           write numbered PNGs (?ext=jpg for JPEG)

Decoding and encoding go through OpenCV's FFmpeg build. In a `--no-drop` render the source
reads as fast as the engine consumes instead of pacing itself.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import cv2
import numpy as np

from streamnode.frames import Frame
from streamnode.io.base import (
    Pacer,
    SourceEnded,
    Transport,
    TransportError,
    TransportOptions,
    UriParams,
)

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
# mp4v (MPEG-4 part 2) is the codec every OpenCV wheel can write; players from VLC to
# QuickTime open it. avc1 needs an FFmpeg build with an H.264 encoder: ?codec=avc1.
VIDEO_CODECS = {".mp4": "mp4v", ".mov": "mp4v", ".m4v": "mp4v", ".avi": "MJPG", ".mkv": "XVID"}


def _natural_key(path: Path) -> list[object]:
    # frame2.png before frame10.png
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


class FileSource(Transport):
    """Frames from a video file, an image folder or one image."""

    def __init__(self, path: str | Path, *, fps: float | None = None, default_fps: float = 30.0,
                 loop: bool = True, pace: bool = True, uri: str = "") -> None:
        self.path = Path(path).expanduser()
        self.uri = uri or f"file://{path}"
        self.loop = loop
        self.pace = pace
        self._images: list[Path] = []
        if self.path.is_dir():
            self._images = sorted((p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES),
                                  key=_natural_key)
            if not self._images:
                raise TransportError(f"{self.uri}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {self.path}")
        elif self.path.suffix.lower() in IMAGE_SUFFIXES and self.path.is_file():
            self._images = [self.path]
        elif not self.path.is_file():
            raise TransportError(f"{self.uri}: no such file or folder: {self.path}")
        native = None if self._images else self._probe_fps()
        self.fps = fps or native or default_fps
        self._cap: cv2.VideoCapture | None = None
        self._bgr: np.ndarray | None = None
        self._rgb: np.ndarray | None = None
        self._index = 0
        self._pacer = Pacer(self.fps)

    @classmethod
    def from_uri(cls, uri: str, target: str, params: UriParams, options: TransportOptions) -> FileSource:
        if not target:
            raise TransportError(f"{uri!r}: name a file, e.g. file://clip.mp4 or file:///abs/path/frames/")
        fps = params.number("fps", None, minimum=0.001)
        loop = params.flag("loop", options.loop)
        params.done()
        return cls(target, fps=fps, default_fps=options.fps, loop=loop, pace=options.realtime, uri=uri)

    def _probe_fps(self) -> float | None:
        cap = cv2.VideoCapture(str(self.path))
        try:
            if not cap.isOpened():
                raise TransportError(f"{self.uri}: OpenCV cannot decode {self.path} (not a video, or an unsupported codec)")
            fps = cap.get(cv2.CAP_PROP_FPS)
        finally:
            cap.release()
        return fps if 0 < fps <= 1000 else None

    def open(self) -> None:
        self.close()
        if not self._images:
            self._cap = cv2.VideoCapture(str(self.path))
            if not self._cap.isOpened():
                raise TransportError(f"{self.uri}: cannot open {self.path}")
        self._index = 0
        self._pacer.reset()

    def read(self, timeout: float) -> np.ndarray | None:
        if self.pace and not self._pacer.wait(timeout):
            return None
        bgr = self._read_video() if self._cap is not None else self._read_image()
        if bgr is None:
            return None
        if self._rgb is None or self._rgb.shape != bgr.shape:
            self._rgb = np.empty(bgr.shape, np.uint8)
        cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB, dst=self._rgb)
        return self._rgb

    def _read_video(self) -> np.ndarray | None:
        assert self._cap is not None
        ok, frame = self._cap.read(self._bgr)
        if not ok:
            if not self.loop:
                raise SourceEnded(self.uri)
            self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, frame = self._cap.read(self._bgr)
            if not ok:
                raise TransportError(f"{self.uri}: cannot read a frame after rewinding")
        self._bgr = frame
        return frame

    def _read_image(self) -> np.ndarray | None:
        if self._index >= len(self._images):
            if not self.loop:
                raise SourceEnded(self.uri)
            self._index = 0
        path = self._images[self._index]
        self._index += 1
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            logger.warning("%s: cannot read %s; skipped", self.uri, path)
        return image

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


class FileSink(Transport):
    """Writes the output as a video file or as numbered images in a folder."""

    def __init__(self, path: str | Path, width: int, height: int, fps: float, *,
                 codec: str | None = None, image_ext: str = "png", uri: str = "", realtime: bool = False) -> None:
        self.path = Path(path).expanduser()
        # Live (realtime) video: frames are placed on the wall clock at the container's fixed
        # rate, so the file plays back at the speed the node really ran. A render (--no-drop)
        # writes each frame once: there, output n is input n.
        self.realtime = realtime
        self._t0 = 0.0
        self._slots = 0  # container frames written (>= self.frames when frames were repeated)
        self.uri = uri or f"file://{path}"
        self.width, self.height, self.fps_out = width, height, fps
        self.as_images = str(path).endswith(("/", "\\")) or self.path.is_dir() or not self.path.suffix
        suffix = self.path.suffix.lower()
        if not self.as_images and codec is None and suffix not in VIDEO_CODECS:
            raise TransportError(
                f"{self.uri}: unknown video type {suffix!r}; use {', '.join(VIDEO_CODECS)}, "
                "a folder (file://out/), or name a FourCC with ?codec="
            )
        self.codec = codec or VIDEO_CODECS.get(suffix, "")
        self.image_ext = image_ext
        self.frames = 0  # frames written since the sink was created (image numbers go on after a reopen)
        self._part = 0  # video part files opened
        self._part_frames = 0  # frames in the current part
        self.files: list[Path] = []  # the video files written, in order
        self._writer: cv2.VideoWriter | None = None
        self._bgr = np.zeros((height, width, 3), np.uint8)

    @classmethod
    def from_uri(cls, uri: str, target: str, params: UriParams, options: TransportOptions) -> FileSink:
        if not target:
            raise TransportError(f"{uri!r}: name a file or folder, e.g. file://out.mp4 or file://out/")
        fps = params.number("fps", options.fps, minimum=0.001)
        codec = params.text("codec")
        if codec is not None and len(codec) != 4:
            raise TransportError(f"{uri}: codec={codec!r} must be a four-letter FourCC such as mp4v, avc1, MJPG")
        ext = params.text("ext", "png", choices=("png", "jpg", "bmp", "tif"))
        params.done()
        return cls(target, options.width, options.height, fps, codec=codec, image_ext=ext, uri=uri,
                   realtime=options.realtime)

    def open(self) -> None:
        """Start writing. Opened again after a failure, it never loses what it wrote: numbered
        images go on from the next number, and a video goes on in a new part file
        (`out.part2.mp4`, …: a finished MP4 cannot be appended to)."""
        self.close()
        self._slots = 0
        if self.as_images:
            self.path.mkdir(parents=True, exist_ok=True)
            return
        if self._part == 0 or self._part_frames:
            self._part += 1  # a part that holds frames is kept; an empty one is simply rewritten
        self._part_frames = 0
        path = self.path if self._part == 1 else self.path.with_name(f"{self.path.stem}.part{self._part}{self.path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = cv2.VideoWriter(
            str(path), cv2.VideoWriter_fourcc(*self.codec), self.fps_out, (self.width, self.height)
        )
        if not self._writer.isOpened():
            self._writer = None
            raise TransportError(
                f"{self.uri}: OpenCV cannot write {path} with codec {self.codec}; "
                "try another container (.mp4, .avi) or ?codec="
            )
        if path not in self.files:
            self.files.append(path)
        if self._part == 1:
            logger.info("%s: writing %dx%d at %.3g fps (%s)", self.uri, self.width, self.height, self.fps_out,
                        self.codec)
        else:
            logger.warning("%s: reopened after a failure; the recording goes on in %s", self.uri, path.name)

    def send(self, frame: Frame) -> None:
        image = frame.image
        if image.shape[:2] != (self.height, self.width):
            # Only when the output size changed under a running file (a model switch): rare.
            image = cv2.resize(image, (self.width, self.height), interpolation=cv2.INTER_AREA)
        cv2.cvtColor(image, cv2.COLOR_RGB2BGR, dst=self._bgr)
        if self.as_images:
            out = self.path / f"frame_{self.frames:06d}.{self.image_ext}"
            if not cv2.imwrite(str(out), self._bgr):
                raise OSError(f"cannot write {out}")
        else:
            assert self._writer is not None, "send() before open()"
            for _ in range(self._repeats()):
                self._writer.write(self._bgr)
            self._part_frames += 1
        self.frames += 1

    def _repeats(self) -> int:
        """How many container frames this output fills: 1 for renders; in live mode, the slots
        elapsed since the last write (0 when the node runs faster than the container rate)."""
        if not self.realtime:
            self._slots += 1
            return 1
        now = time.monotonic()
        if self._slots == 0:
            self._t0 = now
            self._slots = 1
            return 1
        due = int((now - self._t0) * self.fps_out) + 1
        n = max(0, due - self._slots)
        self._slots += n
        return n

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None
