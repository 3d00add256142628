"""Audio/video front end: pure tensor functions (file decoding lives in the trainer).

Audio (docs/design.md, "The model"): 16 kHz mono -> M one-second segments -> Kaldi fbank (128 mel bins,
25 ms Hanning window, 10 ms shift, htk_compat, no energy, no dither) -> (x + 4.1426) /
(2 * 3.2001).  ``torchaudio.compliance.kaldi.fbank`` is pure PyTorch, so this runs on
GPU tensors as well.

Fixed length choice: T = 98 frames per segment — exactly what a 1 s segment gives
(1 + (16000 - 400) // 160).  Shorter segments are padded with 0 after normalisation
(0 is the data-set mean), longer ones cropped.  The model's patch embedding drops rows
beyond a whole patch (B/16: 6 x 8 = 48 audio patches; L/14: 7 x 9 = 63).

Video: M frames sampled uniformly (the centre of each of M equal spans), shorter side
resized to ``size`` (bicubic, antialiased), centre-cropped, scaled to [0, 1] and
normalised with CLIP's mean/std.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SAMPLE_RATE = 16_000
NUM_MEL_BINS = 128
NUM_FRAMES = 98
FBANK_MEAN = -4.1426
FBANK_STD = 3.2001
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _fbank(segment: torch.Tensor) -> torch.Tensor:
    from torchaudio.compliance import kaldi
    return kaldi.fbank(segment.unsqueeze(0), sample_frequency=SAMPLE_RATE,
                       num_mel_bins=NUM_MEL_BINS, frame_length=25.0, frame_shift=10.0,
                       window_type="hanning", htk_compat=True, use_energy=False, dither=0.0)


def audio_features(wave: torch.Tensor, sample_rate: int = SAMPLE_RATE, segments: int = 10,
                   num_frames: int = NUM_FRAMES) -> torch.Tensor:
    """(..., samples) mono waveform -> (..., segments, num_frames, 128) normalised fbank.

    The clip is cut (or zero-padded) to ``segments`` seconds first.
    """
    if not isinstance(wave, torch.Tensor) or not wave.is_floating_point():
        raise TypeError(f"wave: expected a floating tensor (..., samples), got "
                        f"{type(wave).__name__ if not isinstance(wave, torch.Tensor) else wave.dtype}")
    if wave.dim() < 1 or wave.shape[-1] == 0:
        raise ValueError(f"wave: expected shape (..., samples) with samples > 0, got {tuple(wave.shape)}")
    if sample_rate != SAMPLE_RATE:
        import torchaudio.functional as AF
        wave = AF.resample(wave, sample_rate, SAMPLE_RATE)
    lead = wave.shape[:-1]
    need = segments * SAMPLE_RATE
    flat = wave.reshape(-1, wave.shape[-1]).float()
    if flat.shape[-1] < need:
        flat = F.pad(flat, (0, need - flat.shape[-1]))
    segs = flat[:, :need].reshape(-1, SAMPLE_RATE)
    out = torch.zeros(segs.shape[0], num_frames, NUM_MEL_BINS, device=wave.device)
    for i, s in enumerate(segs):
        fb = (_fbank(s) - FBANK_MEAN) / (2 * FBANK_STD)
        n = min(num_frames, fb.shape[0])
        out[i, :n] = fb[:n]
    return out.reshape(*lead, segments, num_frames, NUM_MEL_BINS)


def sample_indices(num_frames: int, segments: int = 10) -> torch.Tensor:
    """Index of the centre frame of each of ``segments`` equal spans of the clip."""
    if num_frames <= 0:
        raise ValueError(f"frames: clip has no frames (T={num_frames})")
    pos = (torch.arange(segments, dtype=torch.float64) + 0.5) * num_frames / segments
    return pos.floor().long().clamp_(0, num_frames - 1)


def video_frames(frames: torch.Tensor, segments: int = 10, size: int = 224) -> torch.Tensor:
    """(..., T, H, W, 3) or (..., T, 3, H, W) frames (uint8 0..255 or float 0..1)
    -> (..., segments, 3, size, size) CLIP-normalised."""
    if not isinstance(frames, torch.Tensor):
        raise TypeError(f"frames: expected a tensor, got {type(frames).__name__}")
    if frames.dim() < 4:
        raise ValueError(f"frames: expected (..., T, H, W, 3) or (..., T, 3, H, W), got "
                         f"{tuple(frames.shape)}")
    if frames.shape[-1] == 3 and frames.shape[-3] != 3:
        frames = frames.movedim(-1, -3)          # channels-last -> channels-first
    if frames.shape[-3] != 3:
        raise ValueError(f"frames: expected 3 colour channels, got shape {tuple(frames.shape)}")
    if frames.shape[-4] == segments:     # one frame per segment already (decoded clips)
        x = frames
    else:
        x = frames.index_select(-4, sample_indices(frames.shape[-4], segments).to(frames.device))
    lead = x.shape[:-3]
    x = x.reshape(-1, *x.shape[-3:])
    x = x.float() / 255.0 if not x.is_floating_point() else x.float()
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):       # at the same size the resize is the identity: skip it
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False,
                          antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top:top + size, left:left + size].clamp(0, 1)
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return ((x - mean) / std).reshape(*lead, 3, size, size)
