"""The fast AV-STFP layers: the exact rewrites of SPEC §1 on one joint token buffer.

x has shape (B, M, N, D) with N = Na+1 (audio, CLS first) + Nv+1 (visual, CLS first).
Per layer and stage:
- one LayerNorm and ONE packed QKV projection over all tokens: qkv (B, M, N, 3, H, d);
- attention via ``prompted_attention_qkv`` on strided views of that buffer: the temporal
  stage takes the sequence over frames (dim M), spatial/fusion over tokens (dim N);
  the spatial stage uses segments (audio | visual) with per-modality prompts;
- prompt K/V: ln_1 + the frozen k/v projection of the prompts, once per forward, shaped
  (H, P, d) and broadcast over the batch (stride 0); temporal prompts differ between
  audio and visual positions, so they are gathered once to (N, H, Nt, d) — batch-free;
- prompt rows never get queries (their outputs would be discarded);
- the FFN runs once over the joint buffer.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..ops.attention import prompted_attention_qkv


def _prompt_kv(blk, pk: Optional[torch.Tensor], pv: Optional[torch.Tensor], H: int):
    """Prompt tokens (n, D) -> keys/values (H, n, d) through ln_1 and the frozen k/v proj."""
    if pk is None:
        return None, None
    W, b = blk.attn.in_proj_weight, blk.attn.in_proj_bias
    D = W.shape[1]
    d = D // H
    k = F.linear(blk.ln_1(pk), W[D:2 * D], b[D:2 * D])
    v = F.linear(blk.ln_1(pv), W[2 * D:], b[2 * D:])
    return (k.view(-1, H, d).transpose(0, 1), v.view(-1, H, d).transpose(0, 1))


def _gate(betas, sizes, like):
    """Per-position gate (N, 1) from per-modality scalars."""
    parts = [b.to(like.dtype).expand(n) for b, n in zip(betas, sizes)]
    g = parts[0] if len(parts) == 1 else torch.cat(parts)
    return g.unsqueeze(-1)


def _attend(blk, x, seq_dim, pk, pv, segments, backend):
    """One prompted attention stage; returns ls_1(out_proj(attn)) in (B, M, N, D)."""
    B, M, N, D = x.shape
    H = blk.attn.num_heads
    qkv = F.linear(blk.ln_1(x), blk.attn.in_proj_weight, blk.attn.in_proj_bias)
    qkv = qkv.view(B, M, N, 3, H, D // H)
    o = prompted_attention_qkv(qkv, pk, pv, qkv_dim=3, seq_dim=seq_dim, segments=segments,
                               backend=backend)
    # o is (batch..., L, d) in q's memory order: move the sequence back, free for kernels
    o = o.movedim(-2, seq_dim).reshape(B, M, N, D)
    return blk.ls_1(blk.attn.out_proj(o))


def encode_tokens(model, a: Optional[torch.Tensor], v: Optional[torch.Tensor],
                  backend: str) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    c = model.config
    mods = [m for m, t in (("audio", a), ("visual", v)) if t is not None]
    sizes = [t.shape[2] for t in (a, v) if t is not None]
    x = torch.cat([t for t in (a, v) if t is not None], dim=2) if len(mods) == 2 else (a if a is not None else v)
    H = model.num_heads
    for layer, blk in enumerate(model.visual.transformer.resblocks):
        if c.has("temporal"):
            kv = [_prompt_kv(blk, model.layer_prompts(layer, "tkey", m),
                             model.layer_prompts(layer, "tval", m), H) for m in mods]
            if kv[0][0] is None:
                pk = pv = None
            elif len(mods) == 1:
                pk, pv = kv[0]
            else:       # per-position prompts (N, H, Nt, d): audio rows then visual rows
                pk = torch.cat([k.expand(n, *k.shape) for (k, _), n in zip(kv, sizes)])
                pv = torch.cat([p.expand(n, *p.shape) for (_, p), n in zip(kv, sizes)])
            gate = _gate([getattr(model, f"beta_{m}")[layer] for m in mods], sizes, x)
            x = x + gate * _attend(blk, x, 1, pk, pv, None, backend)
        if c.has("spatial"):
            kv = [_prompt_kv(blk, model.layer_prompts(layer, "spatial", m),
                             model.layer_prompts(layer, "spatial", m), H) for m in mods]
            if len(mods) == 1:
                pk, pv = kv[0]
                segs = None
            else:
                segs = sizes
                pk, pv = ([k for k, _ in kv], [p for _, p in kv])
                if all(k is None for k in pk):
                    pk = pv = None
            x = x + _attend(blk, x, 2, pk, pv, segs, backend)
        if c.has("fusion"):
            p = model.layer_prompts(layer, "fusion")
            pk, pv = _prompt_kv(blk, p, p, H)
            x = x + model.beta_fusion[layer].to(x.dtype) * _attend(blk, x, 2, pk, pv, None, backend)
        x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
    feats = {}
    start = 0
    for m, n in zip(mods, sizes):
        feats[m] = model.visual.ln_post(x[:, :, start])
        start += n
    return feats.get("audio"), feats.get("visual")
