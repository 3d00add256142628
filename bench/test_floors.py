"""bench/floors.py arithmetic, checked by hand on small cases (no GPU, no torch)."""
import pytest

import floors
from floors import Call, Tile


def test_useful_and_executed_flops_by_hand():
    # 3 sequences of 10 queries over 12 keys + 2 prompts, d = 8
    c = Call(batch=3, q_segments=(10,), k_segments=(12,), prompts=(2,), head_dim=8, elem=2,
             prompt_rows=2)
    assert floors.useful_flops(c, "fwd") == 3 * 4 * 10 * 14 * 8
    assert floors.useful_flops(c, "fwdbwd") == 3 * floors.useful_flops(c, "fwd")
    # one sequence per program, 16-row tiles: 1 query block, 1 key step, 1 prompt step
    t = Tile(g=1, slot_m=16, slot_n=16, slot_p=16)
    one = 2 * 16 * 16 * 8                             # one 16x16x8 product
    assert floors.executed_flops(c, t, "fwd") == 3 * (2 + 2) * one
    # two-pass: dq pass 3 (keys) + 5 (prompts), dk/dv pass 4; fused: 5 + 5
    assert floors.executed_flops(c, t, "fwdbwd", "two-pass") == 3 * (4 + 3 + 5 + 4) * one
    assert floors.executed_flops(c, t, "fwdbwd", "fused") == 3 * (4 + 5 + 5) * one
    # packing 2 sequences per program: 2 programs, per-sequence (batched) products, so
    # each step is 2 blocks of 16 x 16 (the unpacked tile's work, 2 groups for 3)
    t2 = Tile(g=2, slot_m=16, slot_n=16, slot_p=16)
    assert floors.executed_flops(c, t2, "fwd") == 2 * 4 * 2 * one
    assert floors.executed_flops(c, t2, "fwdbwd", "fused") == 2 * 14 * 2 * one
    # keys + prompts as one source (the forward and the sequence-owning backward): 12 + 2
    # keys in one 16-slot step; "seq-one": one backward step of 5 products; "seq": a
    # query pass (3 products) and a key pass (4) over its own query tiles (32 rows: twice
    # the 16-row tile's work)
    tk = Tile(g=1, slot_m=16, slot_n=16, slot_p=16, slot_kp=16)
    assert floors.executed_flops(c, tk, "fwd") == 3 * 2 * one
    assert floors.executed_flops(c, tk, "fwdbwd", "seq-one") == 3 * (2 + 5) * one
    assert floors.executed_flops(c, tk, "fwdbwd", "seq") == 3 * (2 + 3 + 4) * one
    assert floors.executed_flops(c, tk, "fwdbwd", "seq", bwd_slot_m=32) == 3 * (2 + 3 + 8) * one
    with pytest.raises(ValueError, match="slot_kp"):
        floors.executed_flops(c, t, "fwdbwd", "seq")
    # the earlier block-diagonal tile computed the whole 32 x 32 grid per step
    tb = Tile(g=2, slot_m=16, slot_n=16, slot_p=16, batched=False)
    assert floors.executed_flops(c, tb, "fwd") == 2 * 4 * (2 * 32 * 32 * 8)


def test_min_bytes_and_floor():
    c = Call(batch=2, q_segments=(4, 6), k_segments=(4, 6), prompts=(1, 1), head_dim=8,
             elem=2, prompt_rows=3)
    x = 2 * 10 * 8 * 2                                 # one of q / k / v / o, bytes
    p = 2 * 3 * 8 * 2                                  # k and v prompts
    lse = 4 * 2 * 10
    assert floors.min_bytes(c, "fwd") == 4 * x + p
    assert floors.min_bytes(c, "fwdbwd") == (4 * x + p) + lse + (5 * x + p + lse) + (3 * x + p)
    assert floors.floor_s(3e9, 1e12, 3e12, 1e15) == 1e-3
    s = floors.summary(c, Tile(1, 16, 16, 16), "fused")
    assert s["fwd_bytes"] == floors.min_bytes(c, "fwd")
    assert 0 < s["fwdbwd_useful_fraction"] <= 1
