"""The fast AV-STFP layers: the exact rewrites of docs/design.md ("Exact rewrites") on one
joint token buffer.

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

The stage functions (``temporal_stage``, ``spatial_stage``, ``fusion_stage``, ``ffn``)
carry the names and argument order of :mod:`avstfp_fast.models.reference`; where a
literal stage takes ``modality``, a fast one takes the layer's :class:`LayerKV`.
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from ..ops.attention import prompted_attention, prompted_attention_qkv
from .config import PromptKey, PromptKind


def _prompt_keys(config, mods) -> List[PromptKey]:
    """The prompts one layer uses, in a fixed order (absent ones are dropped later)."""
    keys = []
    for m in mods:
        if config.has("temporal"):
            keys += [PromptKey(PromptKind.TEMPORAL_KEY, m), PromptKey(PromptKind.TEMPORAL_VALUE, m)]
        if config.has("spatial"):
            keys.append(PromptKey(PromptKind.SPATIAL, m))
    if config.has("fusion"):
        keys.append(PromptKey(PromptKind.FUSION))
    return keys


KV = Tuple[torch.Tensor, torch.Tensor]


def _layer_prompt_kv(model, blk, layer: int, mods, H: int) -> Dict[PromptKey, KV]:
    """All prompt keys/values of one layer from ONE LayerNorm and ONE k|v projection.

    Returns {PromptKey: (k, v)} with k, v of shape (H, n, d) (views); absent prompts are
    missing from the dict.  The temporal stage takes the keys of the TEMPORAL_KEY prompts
    and the values of the TEMPORAL_VALUE prompts (:func:`_temporal_kv`).
    """
    named = [(key, model.layer_prompts(layer, key)) for key in _prompt_keys(model.config, mods)]
    named = [(key, p) for key, p in named if p is not None]
    if not named:
        return {}
    W, b = blk.attn.in_proj_weight, blk.attn.in_proj_bias
    D = W.shape[1]
    d = D // H
    rows = torch.cat([p for _, p in named])                     # (sum n, D): parameters only
    kv = F.linear(blk.ln_1(rows), W[D:], b[D:]).view(-1, 2, H, d)
    out, start = {}, 0
    for key, p in named:
        part = kv[start:start + p.shape[0]].permute(1, 2, 0, 3)   # (2, H, n, d)
        start += p.shape[0]
        out[key] = (part[0], part[1])
    return out


def _temporal_kv(kv: Dict[PromptKey, KV], m: str) -> Optional[KV]:
    """Temporal prompt (keys, values) of modality m: keys of the key prompts, values of
    the value prompts; None without temporal prompts."""
    tk = kv.get(PromptKey(PromptKind.TEMPORAL_KEY, m))
    if tk is None:
        return None
    return tk[0], kv[PromptKey(PromptKind.TEMPORAL_VALUE, m)][1]


class LayerKV(NamedTuple):
    """One layer's prompt keys/values, laid out for the joint buffer: the one value the
    stages take (the counterpart of the literal stages' ``modality``).

    ``temporal``/``spatial``/``fusion`` are (pk, pv) pairs (None, None when absent),
    gathered from :func:`_layer_prompt_kv`'s single LayerNorm + GEMM, still views or,
    for two-modality temporal prompts, one per-position gather (N, H, Nt, d).
    """
    mods: Tuple[str, ...]            # the modalities in buffer order (audio first)
    sizes: Tuple[int, ...]           # their token counts N_m (CLS included)
    temporal: Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]
    spatial: Tuple[object, object]   # two modalities: per-segment lists
    fusion: Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]


def layer_kv(model, blk, layer: int, mods, sizes) -> LayerKV:
    """Gather the prompt K/V of one layer for every stage the config enables."""
    c = model.config
    kv = _layer_prompt_kv(model, blk, layer, mods, model.num_heads)
    temporal = spatial = fusion = (None, None)
    if c.has("temporal"):
        tkv = [_temporal_kv(kv, m) for m in mods]
        if tkv[0] is not None and len(mods) == 1:
            temporal = tkv[0]
        elif tkv[0] is not None:    # per-position prompts (N, H, Nt, d): audio, then visual
            temporal = tuple(torch.cat([t[i].expand(n, -1, -1, -1) for t, n in zip(tkv, sizes)])
                             for i in (0, 1))
    if c.has("spatial"):
        pairs = [kv.get(PromptKey(PromptKind.SPATIAL, m), (None, None)) for m in mods]
        if len(mods) == 1:
            spatial = pairs[0]
        elif any(k is not None for k, _ in pairs):
            spatial = ([k for k, _ in pairs], [p for _, p in pairs])
    if c.has("fusion"):
        fusion = kv.get(PromptKey(PromptKind.FUSION), (None, None))
    return LayerKV(tuple(mods), tuple(sizes), temporal, spatial, fusion)


def _gate(betas, sizes, like):
    """Per-position gate (N, 1) from per-modality scalars."""
    parts = [b.to(like.dtype).expand(n) for b, n in zip(betas, sizes)]
    g = parts[0] if len(parts) == 1 else torch.cat(parts)
    return g.unsqueeze(-1)


def _qkv(blk, x):
    B, M, N, D = x.shape
    H = blk.attn.num_heads
    qkv = F.linear(blk.ln_1(x), blk.attn.in_proj_weight, blk.attn.in_proj_bias)
    return qkv.view(B, M, N, 3, H, D // H)


def _attend(blk, x, seq_dim, pk, pv, segments, backend):
    """One prompted attention stage; returns ls_1(out_proj(attn)) in (B, M, N, D)."""
    B, M, N, D = x.shape
    o = prompted_attention_qkv(_qkv(blk, x), pk, pv, qkv_dim=3, seq_dim=seq_dim,
                               segments=segments, backend=backend)
    # o is (batch..., L, d) in q's memory order: move the sequence back, free for kernels
    o = o.movedim(-2, seq_dim).reshape(B, M, N, D)
    return blk.ls_1(blk.attn.out_proj(o))


def _attend_rows(blk, x, rows, pk, pv, backend):
    """Fusion-style attention (sequence over tokens) for the query rows ``rows`` only."""
    B, M, N, D = x.shape
    qkv = _qkv(blk, x)
    q = qkv[:, :, rows, 0].movedim(2, -2)                          # (B, M, H, R, d)
    k, v = (qkv.select(3, i).movedim(2, -2) for i in (1, 2))       # (B, M, H, N, d)
    o = prompted_attention(q, k, v, pk, pv, backend=backend)
    o = o.movedim(-2, 2).reshape(B, M, len(rows), D)
    return blk.ls_1(blk.attn.out_proj(o))


# ---------------------------------------------------------------- the stages
# Same names and argument order as models/reference.py; ``kv`` (a LayerKV) stands where
# the literal stages take ``modality``: the fast stages run every modality at once.

def temporal_stage(model, blk, layer: int, x: torch.Tensor, kv: LayerKV,
                   backend: str) -> torch.Tensor:
    """Attention over the M frames (seq_dim 1) for every token position; K/V get the
    temporal prompts of the position's modality; gated by beta_<modality>."""
    gate = _gate([getattr(model, f"beta_{m}")[layer] for m in kv.mods], kv.sizes, x)
    return x + gate * _attend(blk, x, 1, *kv.temporal, None, backend)


def spatial_stage(model, blk, layer: int, x: torch.Tensor, kv: LayerKV,
                  backend: str) -> torch.Tensor:
    """Per frame, attention over each modality's own tokens (segments audio | visual)
    with that modality's spatial prompts as extra K/V."""
    segments = list(kv.sizes) if len(kv.mods) == 2 else None
    return x + _attend(blk, x, 2, *kv.spatial, segments, backend)


def fusion_stage(model, blk, layer: int, x: torch.Tensor, kv: LayerKV, backend: str,
                 rows: Optional[List[int]] = None) -> torch.Tensor:
    """Per frame, attention over all tokens with the fusion prompts as extra K/V; gated
    by beta_fusion.  ``rows``: compute (and return) only these query rows (the last
    layer's CLS rows)."""
    beta = model.beta_fusion[layer].to(x.dtype)
    if rows is None:
        return x + beta * _attend(blk, x, 2, *kv.fusion, None, backend)
    return x[:, :, rows] + beta * _attend_rows(blk, x, rows, *kv.fusion, backend)


def ffn(blk, x: torch.Tensor) -> torch.Tensor:
    return x + blk.ls_2(blk.mlp(blk.ln_2(x)))


def encode_tokens(model, a: Optional[torch.Tensor], v: Optional[torch.Tensor],
                  backend: str, tokens: bool = False
                  ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """All layers on the joint buffer; returns ln_post(CLS) per modality, (B, M, D).

    Only the CLS rows feed the output, so the last layer runs its FFN — and, when the
    fusion stage comes last, the fusion queries — on the CLS rows alone (exact).
    ``tokens=True``: the last layer runs on every row and the result is ln_post of ALL
    rows per modality, (B, M, N_m, D) with CLS at row 0: views into one LayerNorm output
    of the joint buffer (no per-modality copies).
    """
    c = model.config
    mods = [m for m, t in (("audio", a), ("visual", v)) if t is not None]
    sizes = [t.shape[2] for t in (a, v) if t is not None]
    x = torch.cat([a, v], dim=2) if len(mods) == 2 else (a if a is not None else v)
    blocks = model.visual.transformer.resblocks
    for layer, blk in enumerate(blocks):
        kv = layer_kv(model, blk, layer, mods, sizes)
        rows = None if tokens or layer < len(blocks) - 1 else [0, sizes[0]][:len(mods)]
        if c.has("temporal"):
            x = temporal_stage(model, blk, layer, x, kv, backend)
        if c.has("spatial"):
            x = spatial_stage(model, blk, layer, x, kv, backend)
        if c.has("fusion"):
            x = fusion_stage(model, blk, layer, x, kv, backend, rows)
        elif rows is not None:
            x = x[:, :, rows]
        x = ffn(blk, x)
    if tokens:
        parts = model.visual.ln_post(x).split(sizes, dim=2)
        return tuple(dict(zip(mods, parts)).get(m) for m in ("audio", "visual"))
    feats = {m: model.visual.ln_post(x[:, :, i]) for i, m in enumerate(mods)}
    return feats.get("audio"), feats.get("visual")
