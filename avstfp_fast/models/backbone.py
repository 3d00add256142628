"""The frozen CLIP image tower: loading it (never downloading) and embedding A/V tokens.

Both the reference and the fast model embed with these functions; they differ only in
the transformer layers.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def load_visual(name: str, pretrained: Optional[str] = None, device=None) -> nn.Module:
    """open_clip's ``VisionTransformer`` for ``name``, random or from a LOCAL checkpoint.

    ``pretrained`` must be a path to a file: a full CLIP state dict (keys ``visual.*``),
    a visual-only state dict, or either wrapped in ``{"state_dict": ...}``.  Tags such as
    "openai" are refused, because they would download.  ``device="meta"`` builds a
    weightless tower (for counting parameters).
    """
    import open_clip
    if name not in open_clip.list_models():
        raise ValueError(f"name: unknown open_clip model {name!r}")
    kw = {} if device is None else {"device": device}
    model = open_clip.create_model(name, pretrained=None, **kw)
    visual = model.visual
    if pretrained is not None:
        if not isinstance(pretrained, (str, os.PathLike)) or not os.path.isfile(pretrained):
            raise ValueError(f"pretrained: expected a path to a local checkpoint file, got "
                             f"{pretrained!r} (downloads are not supported)")
        sd = torch.load(pretrained, map_location="cpu", weights_only=True)
        if isinstance(sd, dict) and "state_dict" in sd:
            sd = sd["state_dict"]
        sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
        if any(k.startswith("visual.") for k in sd):
            sd = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
        missing, unexpected = visual.load_state_dict(sd, strict=False)
        if missing:
            raise ValueError(f"pretrained: checkpoint lacks {len(missing)} tower weights, "
                             f"e.g. {missing[:3]}")
    check_visual(visual)
    return visual


def tiny_visual(width: int = 64, layers: int = 2, heads: int = 2, patch_size: int = 16,
                image_size: int = 64, quick_gelu: bool = False) -> nn.Module:
    """A small random open_clip VisionTransformer for CPU tests and demos."""
    from open_clip.model import QuickGELU
    from open_clip.transformer import VisionTransformer
    return VisionTransformer(image_size=image_size, patch_size=patch_size, width=width,
                             layers=layers, heads=heads, mlp_ratio=4.0, output_dim=width,
                             act_layer=QuickGELU if quick_gelu else nn.GELU)


def check_visual(visual: nn.Module) -> None:
    """Refuse towers whose blocks do not have the structure the model assumes
    (docs/design.md, "The model")."""
    need = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "ln_post")
    missing = [n for n in need if not hasattr(visual, n)]
    if missing:
        raise TypeError(f"visual: expected an open_clip VisionTransformer, missing {missing}")
    blk = visual.transformer.resblocks[0]
    if not isinstance(getattr(blk, "attn", None), nn.MultiheadAttention):
        raise TypeError("visual: blocks must use nn.MultiheadAttention (open_clip default); "
                        f"got {type(getattr(blk, 'attn', None)).__name__}")
    if getattr(blk.attn, "in_proj_weight", None) is None:
        raise TypeError("visual: attention must have a packed in_proj_weight")


def patch_size(visual) -> int:
    return visual.conv1.kernel_size[0]


def image_size(visual) -> int:
    g = int(round((visual.positional_embedding.shape[0] - 1) ** 0.5))
    return g * patch_size(visual)


def _tokens(visual, patches: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """(n, D, gh, gw) patch features -> ln_pre([CLS; patches] + pos), (n, 1+gh*gw, D)."""
    x = patches.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + pos.to(x.dtype)
    return visual.ln_pre(x)


def embed_video(visual, video: torch.Tensor) -> torch.Tensor:
    """(B, M, 3, S, S) normalised frames -> (B, M, Nv+1, D) tokens."""
    B, M = video.shape[:2]
    p = visual.conv1(video.flatten(0, 1).to(visual.conv1.weight.dtype))
    return _tokens(visual, p, visual.positional_embedding).unflatten(0, (B, M))


def audio_pos_embed(visual, gh: int, gw: int) -> torch.Tensor:
    """CLIP's grid positional embedding resized (bicubic) to the audio grid; CLS kept.

    The resize runs in the tower's dtype (float32 or float64); only half types are
    upcast to float32 for it, so a float64 model stays float64 end to end."""
    pos = visual.positional_embedding
    g = int(round((pos.shape[0] - 1) ** 0.5))
    grid = pos[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
    if (gh, gw) != (g, g):
        work = torch.float32 if pos.dtype in (torch.float16, torch.bfloat16) else pos.dtype
        grid = F.interpolate(grid.to(work), size=(gh, gw), mode="bicubic",
                             align_corners=False).to(pos.dtype)
    return torch.cat([pos[:1], grid.flatten(2).transpose(1, 2)[0]], dim=0)


def embed_audio(visual, audio: torch.Tensor) -> torch.Tensor:
    """(B, M, T, F) normalised fbank -> (B, M, Na+1, D) tokens.

    The spectrogram is a 1-channel image (time x frequency).  Patch embedding is CLIP's
    ``conv1`` with its RGB weights summed (derived on the fly, so full fine-tuning trains
    the shared weights); rows/cols beyond a whole patch are dropped by the stride.
    """
    B, M, T, Fq = audio.shape
    w = visual.conv1.weight.sum(dim=1, keepdim=True)
    ps = patch_size(visual)
    p = F.conv2d(audio.flatten(0, 1).unsqueeze(1).to(w.dtype), w, stride=ps)
    pos = audio_pos_embed(visual, p.shape[-2], p.shape[-1])
    return _tokens(visual, p, pos).unflatten(0, (B, M))

