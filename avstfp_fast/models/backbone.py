"""The frozen CLIP image tower: loading it (open_clip names and weights) and embedding A/V
tokens.

Both the reference and the fast model embed with these functions; they differ only in
the transformer layers.

Weights (``pretrained``), as open_clip users have them (docs/weights.md):

* an open_clip **tag** of the model (``openai``, ``laion2b_s34b_b88k``, ...): resolved
  through open_clip's own pretrained table, cache and download (``cache_dir``: open_clip's
  default); offline and not cached is a one-line error saying how to pass a local file.
  The activation follows the tag's configuration (QuickGELU for ``openai``), as
  ``open_clip.create_model(..., force_quick_gelu=...)`` builds it;
* a **local file**: a CLIP state dict (keys ``visual.*``), a visual-only state dict,
  either wrapped as ``{"state_dict": ...}`` (open_clip's training checkpoints, whose
  ``name`` says the model), ``.safetensors``, or OpenAI's own TorchScript archive (loaded
  as open_clip loads it: its state dict, QuickGELU tower).  Files that say which
  activation their weights were trained with (OpenAI files; a wrapper's open_clip ``name``
  or ``quick_gelu`` key) are checked against the tower: a mismatch is a one-line error
  naming the model to use.  A plain state dict does not record its activation: name the
  tower accordingly (``ViT-B-16-quickgelu`` for OpenAI weights).  Tensors whose shapes do
  not fit the tower are a one-line error naming the first one.

A confirmation line (logger ``avstfp_fast.models``, INFO) names the file and the number
of tensors loaded; open_clip's own log lines during the build (including its "No
pretrained weights loaded" when this module loads the weights itself) are silenced.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import zipfile
from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger("avstfp_fast.models")

__all__ = ["load_visual", "read_pretrained", "check_pretrained", "tiny_visual", "check_visual",
           "PretrainedWeights", "open_clip_name_of", "embed_video", "embed_audio"]

# keys of OpenAI's CLIP state dicts that open_clip's do not have (OpenAI-format weights)
_OPENAI_KEYS = ("input_resolution", "context_length", "vocab_size")
_DOCS = "docs/weights.md"


@dataclasses.dataclass
class PretrainedWeights:
    """Tower weights read from a file or an open_clip tag."""
    path: str                       # the file read
    state: dict                     # visual tower state dict (no ``visual.`` prefix)
    tag: Optional[str] = None       # open_clip tag it came from
    quick_gelu: Optional[bool] = None   # activation the weights were trained with (None: unknown)
    follow: bool = False            # build the tower with that activation (tags, OpenAI files)
    origin: str = ""                # what told the activation, for messages

    @property
    def label(self) -> str:
        return f"open_clip tag {self.tag!r} ({self.path})" if self.tag else self.path


@contextmanager
def _quiet_open_clip():
    """open_clip logs through the root logger: INFO chatter, and a misleading "No
    pretrained weights loaded ... initialized randomly" when this module loads the weights
    itself.  Drop its records while it builds a model."""
    mark = os.sep + "open_clip" + os.sep

    class _Drop(logging.Filter):
        def filter(self, record):
            return mark not in (record.pathname or "")
    root, f = logging.getLogger(), _Drop()
    root.addFilter(f)
    try:
        yield
    finally:
        root.removeFilter(f)


def _is_torchscript(path: str) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.split("/", 1)[-1].startswith("code/") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _name_quick_gelu(name: str) -> Optional[bool]:
    import open_clip
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        return None
    return bool(cfg.get("quick_gelu", False))


def _read_file(path: str) -> PretrainedWeights:
    qg, follow, origin = None, False, ""
    if _is_torchscript(path):
        try:
            sd = torch.jit.load(path, map_location="cpu").state_dict()
        except Exception as e:
            raise ValueError(f"pretrained: {path} is a TorchScript archive that torch.jit "
                             f"cannot load ({_first_line(e)})") from None
        qg, follow, origin = True, True, "an OpenAI TorchScript archive"
    elif path.endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            sd = load_file(path, device="cpu")
        except Exception as e:
            raise ValueError(f"pretrained: cannot read {path} as safetensors "
                             f"({_first_line(e)})") from None
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"pretrained: cannot read {path} as a weights file "
                             f"({_first_line(e)})") from None
    if isinstance(sd, dict) and "state_dict" in sd:
        wrapper, sd = sd, sd["state_dict"]
        if isinstance(wrapper.get("quick_gelu"), bool):
            qg, origin = wrapper["quick_gelu"], "its 'quick_gelu' entry"
        elif isinstance(wrapper.get("name"), str) and _name_quick_gelu(wrapper["name"]) is not None:
            qg = _name_quick_gelu(wrapper["name"])
            origin = f"its open_clip model name {wrapper['name']!r}"
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor)
                                                     for v in sd.values()):
        raise ValueError(f"pretrained: {path} holds no state dict of tensors (got "
                         f"{type(sd).__name__}); expected an open_clip/OpenAI CLIP checkpoint")
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    if any(k in sd for k in _OPENAI_KEYS):
        if not origin:
            qg, follow, origin = True, True, "OpenAI-format weights"
        sd = {k: v for k, v in sd.items() if k not in _OPENAI_KEYS}
    if any(k.startswith("visual.") for k in sd):
        sd = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    return PretrainedWeights(path, sd, None, qg, follow, origin)


def read_pretrained(name: str, pretrained, cache_dir: Optional[str] = None) -> PretrainedWeights:
    """The tower weights ``pretrained`` names for open_clip model ``name``: a local file or
    an open_clip tag (downloaded into / read from open_clip's cache)."""
    import open_clip
    if not isinstance(pretrained, (str, os.PathLike)):
        raise TypeError(f"pretrained: expected a file path or an open_clip tag, got "
                        f"{type(pretrained).__name__}")
    p = os.fspath(pretrained)
    if os.path.isfile(p):
        return _read_file(p)
    tags = open_clip.list_pretrained_tags_by_model(name)
    tag = p.lower().replace("-", "_")      # open_clip's tag spelling
    if tag in tags:
        from open_clip import pretrained as oc_pretrained
        cfg = open_clip.get_pretrained_cfg(name, tag)
        hub_log = logging.getLogger("huggingface_hub")
        level = hub_log.level
        hub_log.setLevel(logging.ERROR)      # its retry warnings: the error below says it
        try:
            path = oc_pretrained.download_pretrained(cfg, cache_dir=cache_dir)
        except Exception as e:
            raise ValueError(
                f"pretrained: open_clip's {name} weights {tag!r} are not in its cache "
                f"({cache_dir or 'the default cache'}) and could not be downloaded "
                f"({_first_line(e)}); on a machine without network, fetch them elsewhere "
                f"and pass the file: --pretrained /path/to/{name}.pt ({_DOCS})") from None
        finally:
            hub_log.setLevel(level)
        if not path or not os.path.isfile(path):
            raise ValueError(f"pretrained: open_clip gave no weights file for {name} tag "
                             f"{tag!r} (got {path!r})")
        w = _read_file(path)
        w.tag, w.quick_gelu, w.follow = tag, bool(cfg.get("quick_gelu", False)), True
        w.origin = f"open_clip's configuration of tag {tag!r}"
        return w
    if os.sep in p or os.path.splitext(p)[1] in (".pt", ".pth", ".bin", ".safetensors"):
        raise FileNotFoundError(f"pretrained: no such file: {p}")
    raise ValueError(f"pretrained: {p!r} is neither a file nor an open_clip tag of {name} "
                     f"(its tags: {', '.join(tags) or 'none'})")


# weights read by check_pretrained, kept for the load that follows (one entry)
_CHECKED: dict = {}


def _file_key(name, pretrained):
    p = os.fspath(pretrained)
    st = os.stat(p) if os.path.isfile(p) else None
    return (name, p, st.st_mtime_ns if st else None, st.st_size if st else None)


def _tower_activation(name: str, w: Optional[PretrainedWeights]) -> bool:
    """QuickGELU or not for tower ``name`` with weights ``w`` (one-line error on a
    mismatch the weights declare)."""
    qg = bool(_name_quick_gelu(name))
    if w is None or w.quick_gelu is None or w.quick_gelu == qg:
        return qg
    if w.follow:
        return w.quick_gelu
    want = "QuickGELU" if w.quick_gelu else "GELU"
    have = "QuickGELU" if qg else "GELU"
    alt = name + "-quickgelu" if w.quick_gelu else name[:-len("-quickgelu")] \
        if name.endswith("-quickgelu") else None
    import open_clip
    hint = f"; use --backbone {alt}" if alt and alt in open_clip.list_models() else ""
    raise ValueError(f"pretrained: {w.label} holds weights trained with {want} ({w.origin}), "
                     f"but the {name} tower uses {have}{hint}")


def _check_fits(visual: nn.Module, w: PretrainedWeights, name: str) -> tuple:
    have = visual.state_dict()
    bad = [(k, tuple(v.shape), tuple(have[k].shape)) for k, v in w.state.items()
           if k in have and tuple(v.shape) != tuple(have[k].shape)]
    if bad:
        k, fs, ts = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ValueError(f"pretrained: {w.label} does not fit the {name} tower: {k} is "
                         f"{fs} in the file, {ts} in the tower{more}; the weights are for "
                         f"another model")
    missing = [k for k in have if k not in w.state]
    if missing:
        raise ValueError(f"pretrained: {w.label} lacks {len(missing)} of the {name} tower's "
                         f"{len(have)} tensors, e.g. {missing[:3]}")
    unexpected = [k for k in w.state if k not in have]
    return len(have), unexpected


def _build(name: str, quick_gelu: bool, device=None) -> nn.Module:
    import open_clip
    kw = {} if device is None else {"device": device}
    with _quiet_open_clip():
        return open_clip.create_model(name, pretrained=None, quick_gelu=quick_gelu, **kw).visual


def check_pretrained(name: str, pretrained, cache_dir: Optional[str] = None) -> None:
    """Everything :func:`load_visual` checks about ``pretrained`` (readable, activation,
    shapes), without building the real tower: for command lines, before any data work.
    The weights read are kept for the next ``load_visual(name, pretrained)``."""
    import open_clip
    if name not in open_clip.list_models():
        raise ValueError(f"backbone: unknown open_clip model {name!r}")
    _CHECKED.clear()
    if pretrained is None:
        return
    w = read_pretrained(name, pretrained, cache_dir)
    _check_fits(_build(name, _tower_activation(name, w), device="meta"), w, name)
    _CHECKED[_file_key(name, pretrained)] = w


def load_visual(name: str, pretrained: Optional[str] = None, device=None,
                cache_dir: Optional[str] = None) -> nn.Module:
    """open_clip's ``VisionTransformer`` for ``name``, random or with the weights
    ``pretrained`` names (a local file or an open_clip tag; see the module docstring).
    ``device="meta"`` builds a weightless tower (for counting parameters).

    The tower records where it came from in ``visual.avstfp_source`` (open_clip name, tag,
    file, activation), which prompt files record."""
    import open_clip
    if name not in open_clip.list_models():
        raise ValueError(f"name: unknown open_clip model {name!r}")
    w = None
    if pretrained is not None:
        w = _CHECKED.pop(_file_key(name, pretrained), None) or \
            read_pretrained(name, pretrained, cache_dir)
    qg = _tower_activation(name, w)
    visual = _build(name, qg, device)
    if w is not None:
        n, unexpected = _check_fits(visual, w, name)
        visual.load_state_dict({k: v for k, v in w.state.items() if k not in unexpected},
                               strict=True)
        act = "QuickGELU" if qg else "GELU"
        why = f", {act} from {w.origin}" if w.quick_gelu is not None else f", {act}"
        log.info("pretrained: loaded %d tensors of the %s tower from %s%s%s", n, name, w.label,
                 why, f" ({len(unexpected)} file tensors unused)" if unexpected else "")
    check_visual(visual)
    visual.avstfp_source = {"open_clip_name": name, "pretrained_tag": w.tag if w else None,
                            "pretrained_file": w.path if w else None, "quick_gelu": qg}
    return visual


def open_clip_name_of(visual: nn.Module) -> Optional[str]:
    """The open_clip model name a tower was built from: recorded by :func:`load_visual`,
    or the one open_clip ViT configuration whose architecture (layers, width, heads, patch,
    image size, output width, activation) it has; None when there is none."""
    src = getattr(visual, "avstfp_source", None)
    if src and src.get("open_clip_name"):
        return src["open_clip_name"]
    try:
        import open_clip
        blocks = visual.transformer.resblocks
        act = getattr(getattr(blocks[0], "mlp", None), "gelu", None)
        have = (len(blocks), visual.conv1.out_channels, blocks[0].attn.num_heads,
                patch_size(visual), image_size(visual),
                None if getattr(visual, "proj", None) is None else visual.proj.shape[1],
                type(act).__name__ == "QuickGELU")
    except AttributeError:
        return None
    found = []
    for n in open_clip.list_models():
        c = open_clip.get_model_config(n) or {}
        v = c.get("vision_cfg") or {}
        if "timm_model_name" in v or "layers" not in v or not isinstance(v.get("layers"), int):
            continue
        if set(v) - {"image_size", "layers", "width", "patch_size", "head_width", "mlp_ratio"}:
            continue
        width = v.get("width", 768)
        cand = (v["layers"], width, width // v.get("head_width", 64), v.get("patch_size"),
                v.get("image_size"), c.get("embed_dim"), bool(c.get("quick_gelu", False)))
        if cand == have and v.get("mlp_ratio", 4.0) == 4.0:
            found.append(n)
    return min(found, key=len) if found else None


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

