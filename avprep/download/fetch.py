"""One clip from YouTube (or any URL yt-dlp understands) into the raw layout: ``ClipFetcher``.

yt-dlp resolves the clip's page into media URLs (the format selector picks video and audio of
at most ``max_height`` lines); FFmpeg then reads only the listed window from them and writes it
in one stated format, ``OUTPUT_FORMAT``, into a temporary file that is checked (PyAV: a video
and an audio stream, long enough) before its rename into the layout. Failures are values
(``ClipStatus``), classified from yt-dlp's and FFmpeg's messages (``classify``); transient ones
(time-outs, 403/429/5xx, truncated answers, YouTube's "try again later") are retried with
exponential backoff. ``ClipFetcher`` holds only its settings, so it pickles (a process pool or
Ray can run it like a thread pool does).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..datasets._base import RemoteClip
from ..errors import ConfigError
from .status import OK, ClipStatus

YOUTUBE = "https://www.youtube.com/watch?v={id}"
# what every downloaded clip is: one container and codec set whatever the source, cut exactly at
# the window (re-encoded, so the first frame is the window's start, not the keyframe before it)
OUTPUT_FORMAT = "MP4, H.264 (libx264, CRF 23, preset veryfast, yuv420p, even size) + AAC, cut at the window"
_ENCODE = ["-c:v", "libx264", "-preset", "veryfast", "-crf", "23", "-pix_fmt", "yuv420p",
           "-vf", "scale=trunc(iw/2)*2:trunc(ih/2)*2", "-c:a", "aac",
           "-fflags", "+bitexact", "-map_metadata", "-1", "-movflags", "+faststart", "-f", "mp4"]


def format_selector(max_height: int) -> str:
    """yt-dlp's format selector: the best video of at most ``max_height`` lines with the best
    audio, else the best combined format that small, else the smallest there is."""
    h = int(max_height)
    return f"bv*[height<={h}]+ba/b[height<={h}]/wv*+ba/w"


# ----------------------------------------------------------------------------- classification

class Transient(Exception):
    """A failure a later attempt may not have (network, throttling, a truncated answer)."""


# (status, patterns): the first rule with a pattern in the lower-cased message wins, so the
# specific YouTube reasons come before the generic "unavailable" their messages also contain
_FINAL_RULES = (
    ("private", ("private video", "this video is private", "video is private")),
    ("geo-blocked", ("available in your country", "not available from your location", "geo restriction",
                     "geo-restricted", "georestricted")),
    ("removed", ("has been removed", "removed by the uploader", "has been terminated", "copyright claim",
                 "copyright grounds", "http error 410", "server returned 410")),
    ("unavailable", ("video unavailable", "this video is not available", "this video does not exist",
                     "no longer available", "http error 404", "server returned 404", "404 not found")),
)
_TRANSIENT = ("try again later", "rate-limited", "rate limit", "http error 429", "server returned 429",
              "http error 403", "server returned 403", "http error 5", "server returned 5", "timed out",
              "timeout", "connection reset", "connection refused", "connection aborted", "broken pipe",
              "stream ends prematurely", "partial file", "end of file", "incomplete", "invalid data found",
              "moov atom not found", "temporarily", "truncated", "unreadable")


def classify(message: str) -> tuple[str, bool]:
    """``(status, transient)`` of a failure message: a final status (private, geo-blocked,
    removed, unavailable) or ``error``, transient or not."""
    text = message.lower()
    for status, patterns in _FINAL_RULES:
        if any(p in text for p in patterns):
            return status, False
    return "error", any(p in text for p in _TRANSIENT)


# ----------------------------------------------------------------------------- ffmpeg

def find_ffmpeg(explicit: str | None = None) -> str:
    """An FFmpeg executable: ``explicit``, else imageio-ffmpeg's, else ``ffmpeg`` on PATH."""
    if explicit:
        path = shutil.which(explicit) or (explicit if os.access(explicit, os.X_OK) else None)
        if path is None:
            raise ConfigError(f"--ffmpeg {explicit}: not an executable ffmpeg")
        return path
    try:
        import imageio_ffmpeg

        path = imageio_ffmpeg.get_ffmpeg_exe()
        if path and os.access(path, os.X_OK):
            return path
    except (ImportError, RuntimeError):
        pass
    path = shutil.which("ffmpeg")
    if path is None:
        raise ConfigError("no ffmpeg executable: install imageio-ffmpeg (pip install 'avprep-ogmge[download]'), "
                          "put ffmpeg on PATH, or pass --ffmpeg PATH")
    return path


# ----------------------------------------------------------------------------- the worker

@dataclass(frozen=True)
class FetchSettings:
    url_template: str = YOUTUBE          # {id}, {start}, {end}, {key}
    ffmpeg: str = "ffmpeg"
    max_height: int = 360
    format: str | None = None            # a yt-dlp format selector; None: format_selector(max_height)
    timeout: float = 30.0                # seconds without data before a connection counts as dead
    retries: int = 3                     # further attempts after a transient failure
    backoff: float = 2.0                 # seconds before the first retry, doubled each time
    min_fraction: float = 0.5            # shortest clip kept, as a fraction of its window
    cookies: str | None = None           # a cookies.txt for yt-dlp (age-restricted videos)


@dataclass(frozen=True)
class FetchTask:
    clip: RemoteClip
    final: str          # where the clip goes (the raw layout)
    tmp_dir: str        # hidden folder for the file being written


@dataclass
class ClipFetcher:
    """The picklable per-clip worker: ``fetcher(task) -> ClipStatus`` (never raises for a clip)."""

    settings: FetchSettings
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False, compare=False)

    def __getstate__(self):
        return {"settings": self.settings}

    def __setstate__(self, state):
        self.settings, self.sleep = state["settings"], time.sleep

    def __call__(self, task: FetchTask) -> ClipStatus:
        s, clip = self.settings, task.clip
        if clip.start is None or clip.end is None:
            return ClipStatus(clip.key, "error", "the list gives no window for this clip")
        last = ""
        for attempt in range(s.retries + 1):
            if attempt:
                self.sleep(s.backoff * 2 ** (attempt - 1))
            try:
                return self._once(task, attempt + 1)
            except Transient as e:
                last = str(e)
            except Exception as e:  # noqa: BLE001 - a clip's failure is a value, never the run's
                return ClipStatus(clip.key, "error", _short(f"{type(e).__name__}: {e}"), attempt + 1)
        return ClipStatus(clip.key, "error", _short(last), s.retries + 1)

    def _once(self, task: FetchTask, attempt: int) -> ClipStatus:
        s, clip = self.settings, task.clip
        assert clip.start is not None and clip.end is not None
        window = clip.end - clip.start
        url = s.url_template.format(id=clip.video_id, start=clip.start, end=clip.end, key=clip.key)
        info, failure = _resolve(url, s)
        if failure is not None:
            status, transient = classify(failure)
            if transient:
                raise Transient(failure)
            return ClipStatus(clip.key, status, _short(failure), attempt)
        duration = info.get("duration")
        if isinstance(duration, (int, float)) and duration - clip.start < s.min_fraction * window:
            return ClipStatus(clip.key, "too-short", f"the video is {duration:g} s long; the window is "
                                                     f"{clip.start:g}-{clip.end:g} s", attempt)
        tmp = Path(task.tmp_dir) / f"{clip.key}.{os.getpid()}.{threading.get_ident()}.mp4"
        try:
            try:
                self._cut(info, clip.start, window, tmp)
            except _FinalFailure as e:
                return ClipStatus(clip.key, e.status, _short(str(e)), attempt)
            result = _check_file(tmp, window, s.min_fraction, clip.key, attempt)
            if result.status == OK:
                final = Path(task.final)
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, final)
            return result
        finally:
            tmp.unlink(missing_ok=True)

    def _cut(self, info: dict, start: float, window: float, tmp: Path) -> None:
        """The window of the resolved media into ``tmp`` (FFmpeg reads only what it needs)."""
        s = self.settings
        formats = info.get("requested_formats") or [info]
        cmd = [s.ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-y"]
        for fmt in formats:
            headers = fmt.get("http_headers") or info.get("http_headers") or {}
            if headers:
                cmd += ["-headers", "".join(f"{k}: {v}\r\n" for k, v in headers.items())]
            cmd += ["-rw_timeout", str(int(s.timeout * 1e6)), "-ss", f"{start:g}", "-t", f"{window:g}",
                    "-i", fmt["url"]]
        if len(formats) > 1:
            cmd += ["-map", "0:v:0", "-map", "1:a:0?"]
        else:
            cmd += ["-map", "0:v:0", "-map", "0:a:0?"]
        cmd += [*_ENCODE, str(tmp)]
        try:
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=4 * s.timeout + 6 * window)
        except subprocess.TimeoutExpired:
            raise Transient(f"ffmpeg: no result within {4 * s.timeout + 6 * window:g} s (timed out)") from None
        if proc.returncode != 0:
            err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
            raise _ffmpeg_failure(" / ".join(err[-3:]) or f"ffmpeg exited with {proc.returncode}")


def _ffmpeg_failure(message: str) -> Exception:
    status, transient = classify(message)
    if transient:
        return Transient(f"ffmpeg: {message}")
    return _FinalFailure(status, f"ffmpeg: {message}")


class _FinalFailure(Exception):
    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


class _Quiet:
    """yt-dlp's logger: nothing is printed (the library never prints); errors come back raised."""

    def debug(self, msg):
        pass

    info = warning = error = debug


def import_yt_dlp():
    """The yt_dlp module (an optional dependency: the ``download`` extra)."""
    try:
        import yt_dlp
    except ImportError:
        raise ConfigError("avprep download needs yt-dlp: pip install 'avprep-ogmge[download]'") from None
    return yt_dlp


def _resolve(url: str, s: FetchSettings) -> tuple[dict, str | None]:
    """(info, None), or ({}, the failure message) from yt-dlp, without downloading anything."""
    yt_dlp = import_yt_dlp()
    opts = {"quiet": True, "no_warnings": True, "noprogress": True, "logger": _Quiet(), "noplaylist": True,
            "cachedir": False, "socket_timeout": s.timeout, "retries": 0, "extractor_retries": 0,
            "format": s.format or format_selector(s.max_height), "color": {"stdout": "never", "stderr": "never"}}
    if s.cookies:
        opts["cookiefile"] = s.cookies
    try:
        with yt_dlp.YoutubeDL(opts) as ydl:
            info = ydl.extract_info(url, download=False)
    except yt_dlp.utils.DownloadError as e:
        return {}, str(e).removeprefix("ERROR: ").strip()
    if not isinstance(info, dict) or not (info.get("url") or info.get("requested_formats")):
        return {}, "yt-dlp found no downloadable format"
    return info, None


def _check_file(path: Path, window: float, min_fraction: float, key: str, attempt: int) -> ClipStatus:
    """The status of a cut clip: a video and an audio stream, at least ``min_fraction`` of the window."""
    from ..errors import ClipError
    from ..media import open_media

    try:
        with open_media(path) as c:
            has_video, has_audio = bool(c.streams.video), bool(c.streams.audio)
            duration = c.duration / 1e6 if c.duration else 0.0
    except ClipError as e:
        raise Transient(f"the downloaded file is unreadable ({e})") from None
    size = path.stat().st_size
    if duration < min_fraction * window:
        return ClipStatus(key, "too-short", f"{duration:.1f} s of a {window:g} s window", attempt, duration, size)
    if not has_video:
        return ClipStatus(key, "error", "the source has no video stream", attempt, duration, size)
    if not has_audio:
        return ClipStatus(key, "no-audio", "the source has no audio stream", attempt, duration, size)
    return ClipStatus(key, OK, "", attempt, round(duration, 3), size)


def _short(message: str, limit: int = 500) -> str:
    message = " ".join(message.split())
    return message if len(message) <= limit else message[:limit - 3] + "..."
