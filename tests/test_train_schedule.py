"""Learning-rate schedule values at key steps, and audio mix-up."""
import math

import numpy as np
import pytest
import torch

from avstfp_fast.train.mixup import audio_mixup, one_hot
from avstfp_fast.train.schedule import build_scheduler, warmup_cosine_lr

PEAK, FLOOR = 3e-4, 2e-6


def lr(step, W=20, T=300):
    return warmup_cosine_lr(step, peak=PEAK, floor=FLOOR, warmup_steps=W, total_steps=T)


def test_key_steps():
    W, T = 20, 300                              # e.g. 2 warm-up epochs of 10 steps, 30 epochs
    assert lr(0) == pytest.approx(PEAK / W)     # the first step already moves
    assert lr(9) == pytest.approx(PEAK * 10 / W)
    assert lr(W - 1) == pytest.approx(PEAK)     # warm-up reaches the peak...
    assert lr(W) == pytest.approx(PEAK)         # ...and the cosine starts there
    mid = W + (T - W - 1) / 2
    assert lr(int(mid)) == pytest.approx((PEAK + FLOOR) / 2, rel=2e-2)
    assert lr(T - 1) == pytest.approx(FLOOR)    # last step: exactly the floor
    assert lr(T) == lr(10 * T) == FLOOR
    vals = [lr(s) for s in range(T)]
    assert all(a <= b for a, b in zip(vals[:W], vals[1:W]))            # rising
    assert all(a >= b for a, b in zip(vals[W:], vals[W + 1:]))         # falling
    assert min(vals) >= FLOOR and max(vals) <= PEAK * (1 + 1e-12)


def test_scheduler_follows_function_per_group():
    p1, p2 = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.Adam([{"params": [p1], "lr": PEAK}, {"params": [p2], "lr": 1e-3}])
    sched = build_scheduler(opt, floor=FLOOR, warmup_steps=4, total_steps=12)
    seen = []
    for step in range(14):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    for step, (a, b) in enumerate(seen):
        assert a == pytest.approx(warmup_cosine_lr(step, peak=PEAK, floor=FLOOR,
                                                   warmup_steps=4, total_steps=12))
        assert b == pytest.approx(warmup_cosine_lr(step, peak=1e-3, floor=FLOOR,
                                                   warmup_steps=4, total_steps=12))
    assert seen[3] == pytest.approx([PEAK, 1e-3]) and seen[11] == pytest.approx([FLOOR] * 2)
    # state round trip
    sd = sched.state_dict()
    opt2 = torch.optim.Adam([{"params": [p1], "lr": PEAK}, {"params": [p2], "lr": 1e-3}])
    s2 = build_scheduler(opt2, floor=FLOOR, warmup_steps=4, total_steps=12)
    opt2.load_state_dict(opt.state_dict())
    s2.load_state_dict(sd)
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]


def test_bad_schedule_args():
    with pytest.raises(ValueError, match="total_steps"):
        warmup_cosine_lr(0, peak=1, floor=0, warmup_steps=0, total_steps=0)
    with pytest.raises(ValueError, match="floor"):
        warmup_cosine_lr(0, peak=1e-3, floor=1, warmup_steps=1, total_steps=10)


def test_mixup_convex_and_seeded():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 10, 98, 128, generator=g)
    y = one_hot(torch.randint(0, 29, (6, 10), generator=g), 29)
    out, t, lam = audio_mixup(a, y, alpha=0.5, prob=1.0, rng=np.random.default_rng(1))
    assert 0.5 <= lam < 1.0
    # recover the permutation from the targets / audio: every row is lam*x_i + (1-lam)*x_j
    rest = (out - lam * a) / (1 - lam)
    for i in range(6):
        j = min(range(6), key=lambda k: float((rest[i] - a[k]).abs().max()))
        assert torch.allclose(rest[i], a[j], atol=1e-4)
        assert torch.allclose(t[i], lam * y[i] + (1 - lam) * y[j], atol=1e-6)
    assert torch.allclose(t.sum(-1), torch.ones(6, 10))
    out2, t2, lam2 = audio_mixup(a, y, alpha=0.5, prob=1.0, rng=np.random.default_rng(1))
    assert lam2 == lam and torch.equal(out2, out) and torch.equal(t2, t)


def test_mixup_off_and_validation():
    a, y = torch.randn(4, 3), one_hot(torch.tensor([0, 1, 2, 1]), 3)
    out, t, lam = audio_mixup(a, y, alpha=0.5, prob=0.0, rng=np.random.default_rng(0))
    assert lam == 1.0 and out is a and t is y
    # the probability gate: about prob of the batches are mixed
    mixed = sum(audio_mixup(a, y, alpha=0.5, prob=0.3, rng=np.random.default_rng(s))[2] < 1
                for s in range(400))
    assert 80 < mixed < 160
    with pytest.raises(ValueError, match="batch"):
        audio_mixup(a, y[:3], alpha=0.5, prob=1.0, rng=np.random.default_rng(0))
    with pytest.raises(TypeError, match="targets"):
        audio_mixup(a, torch.tensor([0, 1, 2, 1]), alpha=0.5, prob=1.0,
                    rng=np.random.default_rng(0))
    assert not math.isnan(float(out.sum()))
