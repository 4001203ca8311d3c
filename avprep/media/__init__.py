"""Decoding with PyAV (README: What is extracted): 1-fps JPEG frames, mono resampled audio, duration fitting.

Speed: video is read sequentially (seeking per frame costs a GOP each time), but only what
the kept frames need is decoded: GOPs that end before the next kept frame are skipped
undecoded and decoding stops after the last kept frame. Only the kept frames are converted:
one swscale call per frame (the resize, staying in Y'CbCr 4:2:0) with one scaler context
reused per thread, then a JPEG encoded straight from those planes (``simplejpeg``), as the
ffmpeg CLI does. ``decode_clip`` reads video and audio of one file in a single demux pass.
Audio that is already mono at the target rate is converted to float32 with numpy (no filter
graph); WAV files are opened without FFmpeg's stream probing (their header says everything,
and probing decodes up to 5 MB of PCM).

One module per reason to change: ``demux`` (opening files, the one demux pass and which video
packets it decodes), ``video`` (which frame is shown at each sampled time, its JPEG), ``audio``
(sample formats, downmix, resampling, plain WAVs, duration fitting) and ``clip`` (the entry
points below, which combine them).

Every failure is a ``ClipError`` whose stage is "open" (missing, empty or not a media file),
"video" or "audio", with a one-line message that names the file.
"""
from __future__ import annotations

from .audio import downmix, fit_duration, read_pcm_wav, resample
from .clip import DecodedClip, decode_audio, decode_clip, decode_frames
from .demux import open_media, video_stream

__all__ = ["decode_frames", "decode_audio", "decode_clip", "fit_duration", "DecodedClip",
           "open_media", "video_stream", "downmix", "resample", "read_pcm_wav"]
