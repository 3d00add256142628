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
# Decoding
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
    import av

    if not os.path.isfile(path):
        raise BadSample("file not found")
    n_samples = int(round(clip_seconds * sample_rate))
    seg_len = clip_seconds / segments
    centres = [(s + 0.5) * seg_len for s in range(segments)]
    best: list = [None] * segments
    best_d = [math.inf] * segments
    chunks: list[np.ndarray] = []
    n_audio = 0
    last_video_t = -1.0
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise BadSample("no video stream")
            if not container.streams.audio:
                raise BadSample("no audio stream")
            vs = container.streams.video[0]
            aus = container.streams.audio[0]
            vs.thread_type = "AUTO"
            rate = float(vs.average_rate or 0) or 25.0      # frames/s, for media_seconds
            resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
            video_done = audio_done = False
            for packet in container.demux(vs, aus):
                if packet.stream.index == vs.index:
                    if video_done:
                        continue
                    for frame in packet.decode():
                        t = frame.time
                        if t is None:
                            continue
                        if t >= clip_seconds:
                            video_done = True
                            break
                        last_video_t = max(last_video_t, t)
                        s = min(int(t // seg_len), segments - 1)
                        d = abs(t - centres[s])
                        if d < best_d[s]:      # keep the frame; convert the winners only
                            best_d[s] = d
                            best[s] = frame
                elif packet.stream.index == aus.index:
                    if audio_done:
                        continue
                    for frame in packet.decode():
                        for rf in resampler.resample(frame):
                            a = rf.to_ndarray().reshape(-1)
                            chunks.append(a)
                            n_audio += a.shape[0]
                    if n_audio >= n_samples:
                        audio_done = True
                if video_done and audio_done:
                    break
            if not audio_done:
                for rf in resampler.resample(None):
                    a = rf.to_ndarray().reshape(-1)
                    chunks.append(a)
                    n_audio += a.shape[0]
    except BadSample:
        raise
    except Exception as e:   # av.error.*, ValueError from a damaged container, ...
        raise BadSample(f"unreadable ({type(e).__name__}: {e})") from None

    if all(b is None for b in best):
        raise BadSample("no decodable video frames")
    try:
        best = [None if f is None else _to_rgb(f, short_side) for f in best]
    except Exception as e:
        raise BadSample(f"unreadable frame ({type(e).__name__}: {e})") from None
    if n_audio < MIN_COVERAGE * n_samples:
        raise BadSample(f"truncated: {n_audio / sample_rate:.2f} s of audio, "
                        f"expected {clip_seconds:g} s")
    if last_video_t + seg_len < MIN_COVERAGE * clip_seconds:
        raise BadSample(f"truncated: video ends at {last_video_t:.2f} s, "
                        f"expected {clip_seconds:g} s")
    if info is not None:
        audio_end = min(n_audio / sample_rate, clip_seconds)
        info["padded"] = [s for s in range(segments)
                          if best[s] is None or audio_end < (s + 0.5) * seg_len]
        info["media_seconds"] = round(min(audio_end, last_video_t + 1.0 / rate, clip_seconds), 3)
    # segments without a frame (video slightly short): nearest earlier (else later) frame
    for s in range(segments):
        if best[s] is None:
            prev = [j for j in range(s - 1, -1, -1) if best[j] is not None]
            nxt = [j for j in range(s + 1, segments) if best[j] is not None]
            best[s] = best[prev[0] if prev else nxt[0]]
    wave = np.concatenate(chunks)[:n_samples].astype(np.float32, copy=False)
    if wave.shape[0] < n_samples:
        wave = np.pad(wave, (0, n_samples - wave.shape[0]))
    if not np.isfinite(wave).all():
        raise BadSample("non-finite audio samples")
    if float(np.abs(wave).max()) < SILENCE_PEAK:
        raise BadSample("silent audio track")
    shapes = {b.shape for b in best}
    if len(shapes) != 1:
        raise BadSample(f"frame size changes within the clip: {sorted(shapes)}")
    return np.stack(best), wave


def _to_rgb(frame, short_side):
    w, h = frame.width, frame.height
    if short_side and min(w, h) > short_side:
        r = short_side / min(w, h)
        w, h = max(2, round(w * r)), max(2, round(h * r))
        return frame.to_ndarray(width=w, height=h, format="rgb24", interpolation="AREA")
    return frame.to_ndarray(format="rgb24")
