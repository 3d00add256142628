"""Media decoding shared by the trainer and avstfp-predict (and the data preparation).

Decoding (PyAV): the first ``clip_seconds`` (10 s) of the file; one RGB frame per segment
(the decoded frame nearest to the segment's centre) and 16 kHz mono audio, zero-padded
when the stream ends a little early.  Unreadable, truncated (less than half of the clip)
or silent files raise :class:`BadSample`.
"""
from __future__ import annotations

import math
import os

import numpy as np

__all__ = ["BadSample", "decode_clip", "SILENCE_PEAK", "MIN_COVERAGE"]

SILENCE_PEAK = 1e-4          # peak |x| below this over the whole clip = silent file
MIN_COVERAGE = 0.5           # decoded audio/video must cover half the clip


class BadSample(Exception):
    """A file that cannot be used (unreadable, truncated, silent, no stream)."""


# --------------------------------------------------------------------------------------
# Decoding: demuxing (what the container holds) and checking / filling (what a clip needs)
# --------------------------------------------------------------------------------------
def decode_clip(path: str, *, segments: int = 10, clip_seconds: float = 10.0,
                sample_rate: int = 16000, short_side: int | None = None,
                info: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decode one file: ``(frames (segments, H, W, 3) uint8, wave (samples,) float32)``.

    ``short_side``: frames whose shorter side is larger are downscaled (area filter,
    aspect kept) while converting, so HD sources cost little later.
    ``info``: a dict that receives ``media_seconds`` (how much of the clip the file
    covers) and ``padded`` (the segments that are padding: no frame of their own, or less
    than half of their audio -- a media file shorter than the clip).
    Raises BadSample for anything unusable.
    """
    media = _demux(path, _Streams(segments, clip_seconds, sample_rate))
    frames = _checked_frames(media, short_side)
    if info is not None:
        info.update(_padding_report(media, frames))
    wave = _filled_wave(media)
    return _filled_frames(frames), wave


class _Streams:
    """What demuxing keeps of a file: per segment the decoded frame nearest to its centre
    (still an ``av.VideoFrame``: only the winners are converted), and the audio chunks
    resampled to mono ``sample_rate``, up to the clip's length."""

    def __init__(self, segments: int, clip_seconds: float, sample_rate: int):
        self.segments, self.clip_seconds, self.sample_rate = segments, clip_seconds, sample_rate
        self.seg_len = clip_seconds / segments
        self.n_samples = int(round(clip_seconds * sample_rate))
        self.frames: list = [None] * segments
        self._dist = [math.inf] * segments
        self.last_video_t = -1.0       # time of the last frame within the clip
        self.frame_rate = 25.0         # frames/s, for media_seconds
        self.chunks: list[np.ndarray] = []
        self.n_audio = 0
        self.video_done = self.audio_done = False

    def add_video(self, frames) -> None:
        for frame in frames:
            t = frame.time
            if t is None:
                continue
            if t >= self.clip_seconds:
                self.video_done = True
                return
            self.last_video_t = max(self.last_video_t, t)
            s = min(int(t // self.seg_len), self.segments - 1)
            d = abs(t - (s + 0.5) * self.seg_len)
            if d < self._dist[s]:
                self._dist[s], self.frames[s] = d, frame

    def add_audio(self, resampled) -> None:
        for rf in resampled:
            a = rf.to_ndarray().reshape(-1)
            self.chunks.append(a)
            self.n_audio += a.shape[0]


def _demux(path: str, media: _Streams) -> _Streams:
    """Read the first ``clip_seconds`` of the file's first video and audio streams into
    ``media``; anything the container or its decoders refuse is a BadSample."""
    import av

    if not os.path.isfile(path):
        raise BadSample("file not found")
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise BadSample("no video stream")
            if not container.streams.audio:
                raise BadSample("no audio stream")
            _read_packets(av, container, media)
    except BadSample:
        raise
    except Exception as e:   # av.error.*, ValueError from a damaged container, ...
        raise BadSample(f"unreadable ({type(e).__name__}: {e})") from None
    return media


def _read_packets(av, container, media: _Streams) -> None:
    """Demux until both streams cover the clip: a frame at or past its end, and its
    number of audio samples (else to the end of the file)."""
    vs, aus = container.streams.video[0], container.streams.audio[0]
    vs.thread_type = "AUTO"
    media.frame_rate = float(vs.average_rate or 0) or 25.0
    resampler = av.AudioResampler(format="flt", layout="mono", rate=media.sample_rate)
    for packet in container.demux(vs, aus):
        if packet.stream.index == vs.index and not media.video_done:
            media.add_video(packet.decode())
        elif packet.stream.index == aus.index and not media.audio_done:
            for frame in packet.decode():
                media.add_audio(resampler.resample(frame))
            media.audio_done = media.n_audio >= media.n_samples
        if media.video_done and media.audio_done:
            break
    if not media.audio_done:
        media.add_audio(resampler.resample(None))      # what the resampler still holds


def _checked_frames(media: _Streams, short_side) -> list:
    """The segments' frames as RGB arrays (None: no frame of its own), once the file has
    frames and covers at least ``MIN_COVERAGE`` of the clip in both streams."""
    if all(f is None for f in media.frames):
        raise BadSample("no decodable video frames")
    try:
        frames = [None if f is None else _to_rgb(f, short_side) for f in media.frames]
    except Exception as e:
        raise BadSample(f"unreadable frame ({type(e).__name__}: {e})") from None
    if media.n_audio < MIN_COVERAGE * media.n_samples:
        raise BadSample(f"truncated: {media.n_audio / media.sample_rate:.2f} s of audio, "
                        f"expected {media.clip_seconds:g} s")
    if media.last_video_t + media.seg_len < MIN_COVERAGE * media.clip_seconds:
        raise BadSample(f"truncated: video ends at {media.last_video_t:.2f} s, "
                        f"expected {media.clip_seconds:g} s")
    return frames


def _padding_report(media: _Streams, frames: list) -> dict:
    """``padded`` (segments without a frame of their own or with less than half of their
    audio) and ``media_seconds`` (how much of the clip the file covers)."""
    audio_end = min(media.n_audio / media.sample_rate, media.clip_seconds)
    padded = [s for s in range(media.segments)
              if frames[s] is None or audio_end < (s + 0.5) * media.seg_len]
    covered = min(audio_end, media.last_video_t + 1.0 / media.frame_rate, media.clip_seconds)
    return {"padded": padded, "media_seconds": round(covered, 3)}


def _filled_frames(frames: list) -> np.ndarray:
    """Segments without a frame (video slightly short) take the nearest earlier (else
    later) frame; all frames must have one size."""
    fill = next(f for f in frames if f is not None)    # before the first frame: the first
    filled = []
    for f in frames:
        fill = f if f is not None else fill
        filled.append(fill)
    shapes = {f.shape for f in filled}
    if len(shapes) != 1:
        raise BadSample(f"frame size changes within the clip: {sorted(shapes)}")
    return np.stack(filled)


def _filled_wave(media: _Streams) -> np.ndarray:
    """The audio cut or zero-padded to the clip's length; it must be finite and not silent."""
    wave = np.concatenate(media.chunks)[:media.n_samples].astype(np.float32, copy=False)
    if wave.shape[0] < media.n_samples:
        wave = np.pad(wave, (0, media.n_samples - wave.shape[0]))
    if not np.isfinite(wave).all():
        raise BadSample("non-finite audio samples")
    if float(np.abs(wave).max()) < SILENCE_PEAK:
        raise BadSample("silent audio track")
    return wave


def _to_rgb(frame, short_side):
    w, h = frame.width, frame.height
    if short_side and min(w, h) > short_side:
        r = short_side / min(w, h)
        w, h = max(2, round(w * r)), max(2, round(h * r))
        return frame.to_ndarray(width=w, height=h, format="rgb24", interpolation="AREA")
    return frame.to_ndarray(format="rgb24")
