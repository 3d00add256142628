"""Audio/video front end: fbank settings of docs/design.md ("The model"), fixed length, frame sampling."""
import pytest
import torch
from torchaudio.compliance import kaldi

from avstfp_fast import frontend as fe


def test_fbank_matches_kaldi_settings():
    wave = torch.randn(3 * 16000) * 0.1
    got = fe.audio_features(wave, segments=3)
    assert got.shape == (3, 98, 128)
    for i in range(3):
        want = kaldi.fbank(wave[i * 16000:(i + 1) * 16000].unsqueeze(0), sample_frequency=16000,
                           num_mel_bins=128, frame_length=25.0, frame_shift=10.0,
                           window_type="hanning", htk_compat=True, use_energy=False, dither=0.0)
        want = (want + 4.1426) / (2 * 3.2001)
        assert torch.allclose(got[i], want, atol=1e-5)


def test_batched_and_padded():
    wave = torch.randn(2, 25_000) * 0.1          # 1.56 s: the rest of 10 s is zero-padded
    out = fe.audio_features(wave)
    assert out.shape == (2, 10, 98, 128)
    single = fe.audio_features(wave[1])
    assert torch.allclose(out[1], single, atol=1e-6)
    assert torch.isfinite(out).all()


def test_resample():
    wave = torch.randn(8000 * 2) * 0.1
    assert fe.audio_features(wave, sample_rate=8000, segments=2).shape == (2, 98, 128)


def test_audio_errors():
    with pytest.raises(TypeError, match="wave"):
        fe.audio_features(torch.ones(100, dtype=torch.int16))
    with pytest.raises(ValueError, match="wave"):
        fe.audio_features(torch.randn(0))


def test_video_sampling_and_normalisation():
    T = 25
    frames = torch.zeros(T, 48, 64, 3, dtype=torch.uint8)
    for t in range(T):
        frames[t] = t * 10                          # frame t is uniformly grey t*10
    out = fe.video_frames(frames, segments=5, size=32)
    assert out.shape == (5, 3, 32, 32)
    idx = fe.sample_indices(T, 5)
    assert idx.tolist() == [2, 7, 12, 17, 22]
    mean = torch.tensor(fe.CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(fe.CLIP_STD).view(3, 1, 1)
    for i, t in enumerate(idx.tolist()):
        want = (t * 10 / 255.0 - mean) / std
        assert torch.allclose(out[i], want.expand(3, 32, 32), atol=1e-4)


def test_video_channels_first_and_batched():
    frames = torch.rand(2, 12, 3, 40, 30)
    out = fe.video_frames(frames, segments=10, size=24)
    assert out.shape == (2, 10, 3, 24, 24)


def test_video_errors():
    with pytest.raises(ValueError, match="frames"):
        fe.video_frames(torch.rand(10, 20, 20))
    with pytest.raises(ValueError, match="colour channels"):
        fe.video_frames(torch.rand(10, 4, 20, 20))
