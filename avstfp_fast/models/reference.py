"""The literal AV-STFP layers: the model of docs/design.md ("The model") written as
the paper states it, in plain PyTorch.

This is the model a careful PyTorch user would write, and the oracle for the fast path
(:mod:`avstfp_fast.models.fast`): prompts are real tokens (with query rows where the
paper appends them), sequences are built with torch.cat and permutes, attention is the
frozen ``nn.MultiheadAttention`` (which uses ``F.scaled_dot_product_attention``).  Audio
and visual run separately except in the fusion stage.  Clarity beats speed here.

``PromptedCLIP`` runs these layers ("literal" path) when its backend is "literal" (or
"reference", the older name); they never call ``prompted_attention``, so no op backend
is involved.
"""
from __future__ import annotations

from typing import Optional

import torch

from .config import PromptKey, PromptKind


def _mha(blk, q_in, k_in=None, v_in=None):
    """The frozen attention of a block on already-normalised inputs."""
    k_in = q_in if k_in is None else k_in
    v_in = q_in if v_in is None else v_in
    return blk.attn(q_in, k_in, v_in, need_weights=False)[0]


def temporal_stage(model, blk, layer: int, x: torch.Tensor, modality: str) -> torch.Tensor:
    """Attention over the M frames for every token position; K/V get temporal prompts."""
    B, M, N, D = x.shape
    seq = x.permute(0, 2, 1, 3).reshape(B * N, M, D)          # (B*N, M, D): one row per position
    h = blk.ln_1(seq)
    k_in, v_in = h, h
    pk = model.layer_prompts(layer, PromptKey(PromptKind.TEMPORAL_KEY, modality))
    if pk is not None:
        pv = model.layer_prompts(layer, PromptKey(PromptKind.TEMPORAL_VALUE, modality))
        k_in = torch.cat([h, blk.ln_1(pk).expand(B * N, -1, -1)], dim=1)
        v_in = torch.cat([h, blk.ln_1(pv).expand(B * N, -1, -1)], dim=1)
    out = blk.ls_1(_mha(blk, h, k_in, v_in))
    beta = getattr(model, f"beta_{modality}")[layer]
    return x + beta * out.reshape(B, N, M, D).permute(0, 2, 1, 3)


def spatial_stage(model, blk, layer: int, x: torch.Tensor, modality: str) -> torch.Tensor:
    """Per frame, append spatial prompts as tokens, attend, drop the prompt rows."""
    B, M, N, D = x.shape
    xs = x.reshape(B * M, N, D)
    p = model.layer_prompts(layer, PromptKey(PromptKind.SPATIAL, modality))
    if p is not None:
        xs = torch.cat([xs, p.expand(B * M, -1, -1)], dim=1)
    xs = xs + blk.ls_1(_mha(blk, blk.ln_1(xs)))
    return xs[:, :N].reshape(B, M, N, D)


def fusion_stage(model, blk, layer: int, a: torch.Tensor, v: torch.Tensor):
    """Per frame, z = [A; P_f; V], attend, split back (prompt rows dropped)."""
    B, M, Na, D = a.shape
    Nv = v.shape[2]
    parts = [a.reshape(B * M, Na, D)]
    p = model.layer_prompts(layer, PromptKey(PromptKind.FUSION))
    nf = 0 if p is None else p.shape[0]
    if p is not None:
        parts.append(p.expand(B * M, -1, -1))
    parts.append(v.reshape(B * M, Nv, D))
    z = torch.cat(parts, dim=1)
    z = z + model.beta_fusion[layer] * blk.ls_1(_mha(blk, blk.ln_1(z)))
    return (z[:, :Na].reshape(B, M, Na, D), z[:, Na + nf:].reshape(B, M, Nv, D))


def ffn(blk, x: torch.Tensor) -> torch.Tensor:
    return x + blk.ls_2(blk.mlp(blk.ln_2(x)))


def encode_tokens(model, a: Optional[torch.Tensor], v: Optional[torch.Tensor], backend=None,
                  tokens: bool = False):
    """Run every layer's three stages and the FFN; return ln_post(CLS) per frame
    (``tokens=True``: ln_post of every token, (B, M, N_m, D) per modality, CLS first).

    ``backend`` is accepted for a signature common with the fast path and ignored: these
    layers use the tower's own attention module."""
    c = model.config
    xs = {"audio": a, "visual": v}
    for layer, blk in enumerate(model.visual.transformer.resblocks):
        for m in xs:
            if xs[m] is not None and c.has("temporal"):
                xs[m] = temporal_stage(model, blk, layer, xs[m], m)
        for m in xs:
            if xs[m] is not None and c.has("spatial"):
                xs[m] = spatial_stage(model, blk, layer, xs[m], m)
        if c.has("fusion"):
            xs["audio"], xs["visual"] = fusion_stage(model, blk, layer, xs["audio"], xs["visual"])
        for m in xs:
            if xs[m] is not None:
                xs[m] = ffn(blk, xs[m])
    if tokens:
        return tuple(None if x is None else model.visual.ln_post(x) for x in (xs["audio"], xs["visual"]))
    feats = [None if x is None else model.visual.ln_post(x[:, :, 0]) for x in (xs["audio"], xs["visual"])]
    return feats[0], feats[1]

