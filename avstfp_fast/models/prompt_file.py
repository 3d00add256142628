"""Prompt files: the learned part of a PromptedCLIP as one small safetensors file.

Prompt tuning trains prompts, gates and the head (1.1M parameters for ViT-B/16, ~4 MB)
on top of a frozen image tower.  A prompt file holds exactly the model's state outside the
tower (by state_dict name): those parameters and the buffers that belong to them (e.g. a
head's BatchNorm running statistics), and, as safetensors string metadata:

``format``                ``avstfp_fast.prompts/1``
``library_version``       avstfp_fast version that wrote it
``config``                the model's AVSTFPConfig as JSON (stages, counts, modalities, head
                          task, classes count, ...)
``backbone``              the tower's name (an open_clip model name, or ``tiny``)
``backbone_arch``         JSON: layers, width, heads, patch_size, image_size, quick_gelu
``backbone_fingerprint``  ``sha256:<hex>`` over the frozen tower's state (names, dtypes,
                          shapes, bytes; see :func:`fingerprint`)
``pretrained``            file name (or open_clip tag) of the tower's weights when known
``pretrained_tag``        the open_clip tag the tower's weights came from (optional):
                          ``from_prompts`` then gets them through open_clip by itself
``contents``              ``prompts`` (prompts, gates, head) or ``everything`` (the tower
                          too: full fine-tuning, or a random tower that cannot be rebuilt
                          from its name)
``classes``               JSON list of class names (optional)
``inputs``                JSON: segments, clip_seconds, sample_rate, image_size (optional)
``trainer_task``          the trainer's task name (optional)
``model_class``           the model class's ``prompt_file_kind`` (``PromptedCLIP``,
                          ``PromptedCLIPAVQA``, ...); absent in older files: ``PromptedCLIP``
``tensors_sha256``        ``sha256:<hex>`` over the tensors (names, dtypes, shapes, bytes):
                          a file whose tensor data changed (a flipped bit) is refused on
                          reading; files without it (older versions) read unchecked
``model_init``            JSON: the class's own constructor keywords, from its
                          ``prompt_file_init()`` hook (absent when empty; for AVQA: ``head``,
                          ``vocabulary``, ``answers``)

A model class adds what it needs to be rebuilt (and to encode its inputs / decode its
outputs) through one hook: the class attribute ``prompt_file_kind`` and the method
``prompt_file_init()`` returning JSON-able constructor keywords;
``from_prompts`` calls ``cls(tower, config=..., **model_init)``.  Files written before these
keys existed (plain ``PromptedCLIP`` models, format 1) read unchanged.

Loading checks, in order, and fails with a ValueError naming what differs: the file is a
complete safetensors file of this format; the model class; the model configuration; the
class's constructor keywords (``model_init``; keys the model leaves None are not
compared); the backbone name and architecture; the tensor names and shapes; and -- for
``prompts`` files -- the fingerprint of the frozen tower it is loaded onto.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Optional, Union

import torch
import torch.nn as nn

from .config import LEGACY_FIELDS, AVSTFPConfig

__all__ = ["FORMAT", "fingerprint", "save_prompts", "read_prompt_file", "load_prompts",
           "from_prompts", "PromptFileError"]

FORMAT = "avstfp_fast.prompts/1"
_FP_ATTR = "_avstfp_fingerprint"


class PromptFileError(ValueError):
    """A prompt file that cannot be used with the given model or backbone."""


# --------------------------------------------------------------------------------------
# fingerprint
# --------------------------------------------------------------------------------------
def _state_key(module: nn.Module) -> tuple:
    # identity + in-place version of every tensor: any optimiser step or load_state_dict
    # bumps a version counter, so a cached fingerprint is never stale
    return tuple((n, t.data_ptr(), t._version, str(t.dtype), tuple(t.shape))
                 for n, t in module.state_dict(keep_vars=True).items())


def fingerprint(module: nn.Module) -> str:
    """``sha256:<hex>`` over ``module``'s state (sorted names, dtypes, shapes, raw bytes).

    Computed once per module and cached on it until one of its tensors changes."""
    key = _state_key(module)
    hit = getattr(module, _FP_ATTR, None)
    if hit is not None and hit[0] == key:
        return hit[1]
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).reshape(-1).numpy().tobytes() if t.numel() else b"")
    fp = "sha256:" + h.hexdigest()
    object.__setattr__(module, _FP_ATTR, (key, fp))
    return fp


def _learned_state(model) -> dict:
    """The state a prompts-only file holds: everything outside the frozen tower."""
    return {n: t for n, t in model.state_dict(keep_vars=True).items()
            if not n.startswith("visual.")}


def _kind(model_or_cls) -> str:
    return getattr(model_or_cls, "prompt_file_kind", "PromptedCLIP")


def _arch(visual: nn.Module) -> dict:
    from . import backbone as bb
    blocks = visual.transformer.resblocks
    act = getattr(getattr(blocks[0], "mlp", None), "gelu", None)
    return {"layers": len(blocks), "width": visual.conv1.out_channels,
            "heads": blocks[0].attn.num_heads, "patch_size": bb.patch_size(visual),
            "image_size": bb.image_size(visual),
            "quick_gelu": type(act).__name__ == "QuickGELU"}


# --------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------
def save_prompts(model, path: str, *, include_backbone: Optional[bool] = None,
                 backbone: Optional[str] = None, pretrained: Optional[str] = None,
                 classes: Optional[list] = None, inputs: Optional[dict] = None,
                 trainer_task: Optional[str] = None) -> str:
    """Write ``model``'s prompts, gates and head (and, with ``include_backbone`` or a
    fully fine-tuned model, every weight) to ``path`` in safetensors format.

    ``backbone``: the tower's name to record (default: the name in the prompt file the
    model came from, else ``model.model_name``; pass ``"tiny"`` for ``PromptedCLIP.tiny``).
    ``include_backbone`` defaults to what the model's own prompt file held."""
    from safetensors.torch import save

    from .. import __version__
    from .._io import atomic_write
    came_from = getattr(model, "prompt_metadata", None) or {}
    if include_backbone is None:
        include_backbone = came_from.get("contents") == "everything"
    everything = bool(include_backbone or model.config.full_finetune)
    if everything:
        state = model.state_dict()
    else:
        state = _learned_state(model)
    tensors = {n: t.detach().cpu().contiguous().clone() for n, t in state.items()}
    meta = {
        "format": FORMAT,
        "library_version": __version__,
        "config": json.dumps(model.config.to_dict()),
        "backbone": backbone or came_from.get("backbone") or model.model_name,
        "backbone_arch": json.dumps(_arch(model.visual)),
        "backbone_fingerprint": fingerprint(model.visual),
        "contents": "everything" if everything else "prompts",
        "model_class": _kind(model),
    }
    init = model.prompt_file_init() if hasattr(model, "prompt_file_init") else {}
    if init:
        meta["model_init"] = json.dumps(init)
    source = getattr(model.visual, "avstfp_source", None) or {}
    if pretrained is None:
        pretrained = source.get("pretrained_tag") or source.get("pretrained_file")
    if pretrained:
        meta["pretrained"] = os.path.basename(str(pretrained))
    tag = source.get("pretrained_tag")
    if tag and (pretrained is None or str(pretrained) == tag):
        meta["pretrained_tag"] = tag      # from_prompts gets the weights from open_clip
    if classes is not None:
        meta["classes"] = json.dumps(list(classes))
    if inputs is not None:
        meta["inputs"] = json.dumps(inputs)
    if trainer_task is not None:
        meta["trainer_task"] = trainer_task
    for key in ("pretrained", "pretrained_tag", "classes", "inputs", "trainer_task"):
        if key not in meta and key in came_from:
            meta[key] = came_from[key]
    meta["tensors_sha256"] = _tensors_digest(tensors)
    data = save(tensors, metadata=meta)
    atomic_write(path, lambda f: f.write(data))
    return os.fspath(path)


# --------------------------------------------------------------------------------------
# read / check / load
# --------------------------------------------------------------------------------------
@dataclasses.dataclass
class PromptFile:
    path: str
    meta: dict             # the raw string metadata
    tensors: dict

    @property
    def config(self) -> AVSTFPConfig:
        return AVSTFPConfig.from_dict(json.loads(self.meta["config"]))

    @property
    def everything(self) -> bool:
        return self.meta.get("contents") == "everything"

    @property
    def arch(self) -> dict:
        return json.loads(self.meta["backbone_arch"])

    @property
    def model_class(self) -> str:
        return self.meta.get("model_class", "PromptedCLIP")

    @property
    def model_init(self) -> dict:
        return self.json("model_init", {})

    def json(self, key: str, default=None):
        return json.loads(self.meta[key]) if key in self.meta else default

    def describe(self) -> str:
        what = ("everything (prompts, gates, head and the tower)" if self.everything
                else "prompts, gates and head")
        n = sum(t.numel() for t in self.tensors.values())
        return (f"{self.path}: {self.model_class} {what}, {len(self.tensors)} tensors, "
                f"{n:,d} values; backbone "
                f"{self.meta.get('backbone')} ({self.meta.get('backbone_fingerprint', '?')[:19]}"
                f"...), written by avstfp_fast {self.meta.get('library_version')}")


def _tensors_digest(tensors: dict) -> str:
    """``sha256:<hex>`` over the tensors (sorted names, dtypes, shapes, raw bytes)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def read_prompt_file(path: str) -> PromptFile:
    """Read and validate the container (not yet against any model)."""
    from safetensors import safe_open
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"PK":            # a zip archive: what torch.save / torch.jit.save write
        raise PromptFileError(
            f"{path}: this is a torch.save archive (a trainer checkpoint such as best.pt, "
            f"or a TorchScript file), not a prompt file; use the prompt file the trainer "
            f"writes beside best.pt (best.prompts.safetensors), or pass the checkpoint to "
            f"avstfp-predict / avstfp_fast.predict.load_model")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:   # safetensors_rust.SafetensorError, OSError, ...
        raise PromptFileError(f"{path}: not a readable safetensors file (truncated or "
                              f"damaged?): {type(e).__name__}: {e}") from None
    if meta.get("format") != FORMAT:
        raise PromptFileError(f"{path}: not an avstfp_fast prompt file (metadata format "
                              f"{meta.get('format')!r}, expected {FORMAT!r})")
    missing = [k for k in ("config", "backbone", "backbone_arch", "backbone_fingerprint",
                           "contents") if k not in meta]
    if missing:
        raise PromptFileError(f"{path}: prompt file metadata lacks {missing}")
    want = meta.get("tensors_sha256")       # absent in files written before it existed
    if want is not None and _tensors_digest(tensors) != want:
        raise PromptFileError(f"{path}: the tensor data is damaged (checksum mismatch: the "
                              f"file records {want[:19]}..., its tensors give "
                              f"{_tensors_digest(tensors)[:19]}...); copy the file again")
    return PromptFile(path, meta, tensors)


def _config_diff(saved: dict, have: dict) -> list[str]:
    keys = [k for k in saved if k not in LEGACY_FIELDS]
    norm = (lambda v: list(v) if isinstance(v, (tuple, list)) else v)
    return [f"{k}: file {norm(saved[k])!r}, model {norm(have.get(k))!r}" for k in keys
            if norm(saved[k]) != norm(have.get(k))]


def _check_class(pf: PromptFile, kind: str) -> None:
    if pf.model_class != kind:
        raise PromptFileError(
            f"{pf.path}: model class differs: the file holds a {pf.model_class} model, this "
            f"is a {kind}; load it with {pf.model_class}.from_prompts")


def _value_diff(key: str, saved, have) -> list[str]:
    """Readable differences between two JSON values (dicts by field, lists by length and
    first differing item)."""
    if isinstance(saved, dict) and isinstance(have, dict):
        return [d for k in sorted(set(saved) | set(have))
                for d in _value_diff(f"{key}.{k}", saved.get(k), have.get(k))]
    if isinstance(saved, (list, tuple)) and isinstance(have, (list, tuple)):
        saved, have = list(saved), list(have)
        if saved == have:
            return []
        i = next((i for i, (a, b) in enumerate(zip(saved, have)) if a != b),
                 min(len(saved), len(have)))
        at = lambda v: repr(v[i]) if i < len(v) else "(end)"   # noqa: E731
        return [f"{key}: file {len(saved)} items, model {len(have)}; first difference at "
                f"[{i}]: file {at(saved)}, model {at(have)}"]
    return [] if saved == have else [f"{key}: file {saved!r}, model {have!r}"]


def _check(pf: PromptFile, model, check_fingerprint: bool) -> None:
    _check_class(pf, _kind(model))
    have_init = model.prompt_file_init() if hasattr(model, "prompt_file_init") else {}
    saved_init = pf.model_init
    idiff = [d for k in sorted(set(saved_init) | set(have_init)) if have_init.get(k) is not None
             for d in _value_diff(k, saved_init.get(k), have_init[k])]
    if idiff:
        raise PromptFileError(f"{pf.path}: {pf.model_class} settings differ: "
                              + "; ".join(idiff))
    diff = _config_diff(json.loads(pf.meta["config"]), model.config.to_dict())
    if diff:
        raise PromptFileError(f"{pf.path}: model configuration differs: " + "; ".join(diff))
    arch = _arch(model.visual)
    adiff = [f"{k}: file {v!r}, backbone {arch.get(k)!r}" for k, v in pf.arch.items()
             if arch.get(k) != v]
    if adiff:
        raise PromptFileError(f"{pf.path}: backbone architecture differs (file: "
                              f"{pf.meta['backbone']!r}): " + "; ".join(adiff))
    want = dict(model.state_dict()) if pf.everything else _learned_state(model)
    missing = sorted(set(want) - set(pf.tensors))
    unexpected = sorted(set(pf.tensors) - set(want))
    shapes = [f"{n}: file {tuple(t.shape)}, model {tuple(want[n].shape)}"
              for n, t in pf.tensors.items() if n in want and t.shape != want[n].shape]
    if missing or unexpected or shapes:
        raise PromptFileError(f"{pf.path}: tensors do not match the model: missing "
                              f"{missing[:8]}, unexpected {unexpected[:8]}, shapes {shapes[:8]}")
    if check_fingerprint and not pf.everything:
        have = fingerprint(model.visual)
        if have != pf.meta["backbone_fingerprint"]:
            src = f" (trained with weights {pf.meta['pretrained']!r})" if "pretrained" in \
                pf.meta else ""
            raise PromptFileError(
                f"{pf.path}: backbone weights differ: the prompts were trained on "
                f"{pf.meta['backbone']!r}{src} with fingerprint "
                f"{pf.meta['backbone_fingerprint']}, this model's frozen tower "
                f"({model.model_name}) has {have}; load the same pretrained weights")


def load_prompts(model, path_or_file: Union[str, PromptFile], *,
                 check_fingerprint: bool = True) -> PromptFile:
    """Copy a prompt file's tensors into ``model`` (bit-exact when the dtypes agree),
    after the checks of the module docstring.  Returns the file (metadata included)."""
    pf = path_or_file if isinstance(path_or_file, PromptFile) else read_prompt_file(path_or_file)
    _check(pf, model, check_fingerprint)
    state = dict(model.state_dict(keep_vars=True))
    with torch.no_grad():
        for n, t in pf.tensors.items():
            state[n].copy_(t.to(state[n].device))
    return pf


def from_prompts(cls, path: str, *, backbone: Union[str, nn.Module, None] = None,
                 pretrained: Optional[str] = None, backend: str = "auto", device=None,
                 check_fingerprint: bool = True):
    """A ``cls`` (PromptedCLIP) built from a prompt file.

    ``backbone``: an open_clip name or a CLIP model / tower module; default the file's
    backbone (``tiny`` is rebuilt from the recorded architecture).  ``pretrained``: the
    local tower weights for a name (needed unless the file holds everything)."""
    pf = read_prompt_file(path)
    _check_class(pf, _kind(cls))
    if pretrained is None and not pf.everything and backbone is None:
        pretrained = pf.meta.get("pretrained_tag")     # open_clip's cache / download
        if pretrained is None and "pretrained" in pf.meta:
            raise PromptFileError(
                f"{path}: the prompts were trained on {pf.meta['backbone']!r} with the weights "
                f"{pf.meta['pretrained']!r}; pass that file (pretrained=..., avstfp-predict "
                f"--pretrained FILE; docs/weights.md)")
    init = pf.model_init
    config = pf.config
    name = pf.meta["backbone"]
    if backbone is None:
        backbone = name
    if isinstance(backbone, str):
        if backbone != name:
            raise PromptFileError(f"{path}: backbone differs: the file was saved from "
                                  f"{name!r}, got {backbone!r}")
        if name == "tiny":
            if pretrained is not None:
                raise ValueError("pretrained: the 'tiny' backbone is random; drop pretrained")
            a = pf.arch
            model = cls.tiny(width=a["width"], layers=a["layers"], heads=a["heads"],
                             patch_size=a["patch_size"], image_size=a["image_size"],
                             quick_gelu=a["quick_gelu"], backend=backend, config=config, **init)
        else:
            import open_clip
            if name not in open_clip.list_models():
                raise PromptFileError(f"{path}: backbone {name!r} is not an open_clip model "
                                      f"name; pass the tower module as backbone=")
            model = cls(name, pretrained=pretrained, backend=backend, config=config, **init)
    else:
        model = cls(backbone, backend=backend, config=config, **init)
    if device is not None:
        model = model.to(device)
    load_prompts(model, pf, check_fingerprint=check_fingerprint)
    model.prompt_metadata = dict(pf.meta)
    return model
