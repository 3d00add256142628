"""Roofline arithmetic of the benchmark cases (docs/design.md, "Floors: bytes and FLOPs").

Kernel floor = max(minimum bytes / copy bandwidth, executed FLOPs / GEMM rate), both
ceilings measured in the same run (timing.measure_ceilings).  The bytes are the minimum
any implementation must move; the FLOPs are those our kernel executes: the useful
matrix products plus tile padding and backward recomputation (executed_flops).  The
useful FLOPs are reported beside them, so executed / useful says how much of the tensor
work is waste.

End-to-end floor = FLOPs at the GEMM rate PLUS bytes at the copy bandwidth (e2e_floor).
"""
from __future__ import annotations

import math
from typing import Dict

import torch

import floors
from geometry import AUDIO_F, AUDIO_T, STAGES, KernelShape, model_arch


def kernel_cost(shape: KernelShape, passes: str) -> Dict[str, float]:
    """Minimum bytes, useful FLOPs and executed FLOPs of one kernel case.

    Forward: read q, k, v and the prompts once, write o once (plus the fp32 row
    log-sum-exp when a backward follows).  Backward: read q, k, v, prompts, o, do, lse;
    write dq, dk, dv, dprompts.  Useful FLOPs count the two matrix products of the
    forward (4·Lq·(Lk+P)·d per sequence and head) and the four of a backward that keeps
    the probabilities (2x forward; FlashAttention-style recomputation would add 0.5x).
    """
    a = shape.arch
    el = torch.finfo(shape.dtype).bits // 8
    T = shape.batch * a.frames * a.tokens            # tokens
    x = T * a.heads * a.head_dim * el                # one of q / k / v / o
    pshape = shape.prompt_shape()
    prompt = 2 * len(shape.prompts) * math.prod(pshape) * el   # k and v prompts, all segments
    lse = T * a.heads * 4
    fl = 0.0
    for count, lq, lk, p in shape.sequences():
        fl += count * 4.0 * lq * (lk + p) * a.head_dim
    fwd_bytes = 3 * x + prompt + x
    if passes == "fwd":
        by, useful = fwd_bytes, fl
    else:
        by, useful = fwd_bytes + lse + (3 * x + prompt + x + x + lse) + (3 * x + prompt), 3.0 * fl
    return {"bytes": float(by), "flops": useful, "executed_flops": executed_flops(shape, passes)}


def executed_flops(shape: KernelShape, passes: str) -> float:
    """FLOPs the triton kernels execute for this case, padding, packing and the backward
    path included: the triton backend's own tile-table entry for the case and the kernels
    it launches (``floors.for_tiles``: the forward over keys + prompts as one source; at
    the AV-STFP stage shapes the sequence-owning backward, whose query pass (S, dP, dQ)
    and key pass (S, dP, dV, dK) compute S and dP twice, or one 5-product step for the
    packed temporal tile), counted by ``floors.executed_flops`` (the same arithmetic as
    the static sm_90 contract's floor table)."""
    from avstfp_fast.ops import triton_backend as tb
    seqs = shape.sequences()
    counts = {s[0] for s in seqs}
    assert len(counts) == 1, f"segments of one call share the batch, got {seqs}"
    t = tb._Tiles(max(s[1] for s in seqs), max(s[2] for s in seqs), max(s[3] for s in seqs),
                  shape.arch.head_dim, shape.dtype)
    call = floors.Call(batch=counts.pop(), q_segments=tuple(s[1] for s in seqs),
                       k_segments=tuple(s[2] for s in seqs), prompts=tuple(s[3] for s in seqs),
                       head_dim=shape.arch.head_dim, elem=torch.finfo(shape.dtype).bits // 8,
                       prompt_rows=0)
    tile, backward, bwd_slot_m = floors.for_tiles(t, tb.BACKWARD_SCHEME)
    return floors.executed_flops(call, tile, passes, backward, bwd_slot_m)


def floor_time(cost: Dict[str, float], ceilings: Dict[str, float]) -> float:
    """Roofline floor of a kernel: the larger of min bytes / copy bandwidth and executed
    FLOPs / GEMM rate (useful FLOPs when a cost carries no executed count)."""
    flops = cost.get("executed_flops", cost["flops"])
    return max(cost["bytes"] / ceilings["copy_Bps"], flops / ceilings["gemm_flops"])


def e2e_cost(model, batch: int, mode: str, dtype=torch.bfloat16) -> Dict[str, float]:
    """Floor ingredients of one training step ("train") or inference forward ("infer").

    FLOPs: the matrix products a perfect implementation must do -- per layer and token,
    one QKV and one output projection per attention stage (3 stages), the MLP; patch
    embedding; the attention products (kernel_cost's useful FLOPs, prompts included).
    The backward of a prompt-tuned model needs input gradients only (frozen weights): 1x
    the forward's products again (2x if the backbone is fine-tuned).
    Bytes: the frozen weights read once per pass (bf16), the inputs read once, and the
    attention floor bytes of every stage and layer (kernel_cost).  Everything else
    (layer norms, GELU, residual adds) could live in GEMM epilogues, so the floor leaves
    it out.
    """
    a = model_arch(model)
    c = model.config
    D, L = model.width, model.num_layers
    blk = model.visual.transformer.resblocks[0]
    hidden = blk.mlp.c_fc.out_features
    T = batch * a.frames * a.tokens
    stages = [s for s in STAGES if c.has(s)]
    per_layer = len(stages) * (2 * T * D * 3 * D + 2 * T * D * D) + 2 * T * D * hidden * 2
    p = a.patch
    embed = 2 * batch * a.frames * (a.nv * 3 + a.na) * p * p * D
    fwd_gemm = L * per_layer + embed
    passes = "fwd" if mode == "infer" else "fwdbwd"
    att_fl = att_by = 0.0
    for s in stages:
        kc = kernel_cost(KernelShape(a, batch, s, dtype), passes)
        att_fl += L * kc["flops"]
        att_by += L * kc["bytes"]
    if mode == "infer":
        gemm = fwd_gemm
        wpasses = 1
    else:
        gemm = fwd_gemm * (3 if c.full_finetune else 2)
        wpasses = 2
    el = torch.finfo(dtype).bits // 8
    wbytes = sum(q.numel() for q in model.visual.parameters()) * el * wpasses
    inbytes = batch * a.frames * (AUDIO_T * AUDIO_F + 3 * a.image ** 2) * 4
    return {"flops": float(gemm + att_fl), "bytes": float(wbytes + inbytes + att_by),
            "tokens": T}


def e2e_floor(cost: Dict[str, float], ceilings: Dict[str, float]) -> float:
    """Training/inference floor: FLOPs at the GEMM rate PLUS bytes at the copy bandwidth."""
    return cost["flops"] / ceilings["gemm_flops"] + cost["bytes"] / ceilings["copy_Bps"]
