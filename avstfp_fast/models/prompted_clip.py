"""``PromptedCLIP``: the AV-STFP model with a runtime-switchable backend.

One module, one parameter set, one ``state_dict`` layout.  ``backend`` only chooses how
the layers are computed, through one table, :data:`LAYER_PATHS`:

- "literal" (backend ``"literal"``; ``"reference"``, the op oracle's name, still selects
  it as it always did): the paper's math written literally
  (:mod:`avstfp_fast.models.reference`): prompts as real tokens with query rows,
  torch.cat, permutes, per-modality attention; it never calls ``prompted_attention``;
- "fast" (every other backend: ``"torch"``, ``"triton"``, ``"cuda"``, ``"auto"``):
  :mod:`avstfp_fast.models.fast` with the exact rewrites of docs/design.md ("Exact
  rewrites": one joint audio|visual token buffer per frame, batch-shared prompt K/V
  computed once per forward, no prompt query rows, strided views instead of permute
  copies); the backend name is passed to ``prompted_attention``.

Parameter names (identical for every backend)::

    visual.*                                  frozen open_clip VisionTransformer
    temporal_key_{audio,visual}               (L, Nt, D)   temporal key prompts
    temporal_value_{audio,visual}             (L, Nt, D)   temporal value prompts
    spatial_{audio,visual}                    (L, Ns, D)   spatial prompts
    fusion_prompts                            (L, Nf, D)   fusion prompts
    beta_{audio,visual}, beta_fusion          (L,)         learnable gates
    head.*                                    task head (AVE: per segment, AVAR: per clip)
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn as nn

from ..ops.backends import AUTO, backend_choices, backend_names, get_backend
from . import backbone as bb
from . import fast, reference, summary
from .config import AVSTFPConfig, PromptKey, PromptKind

# The two implementations of the layers, side by side: same parameters, same function.
LAYER_PATHS = {"literal": reference.encode_tokens, "fast": fast.encode_tokens}
LITERAL_BACKEND = "literal"      # the model's backend name for the literal layers
# Names that select the literal layers: "literal", and "reference" (the op's oracle
# backend, which selected them before "literal" existed; still accepted).
LITERAL_BACKENDS = (LITERAL_BACKEND, "reference")


def layer_path(backend: str) -> str:
    """Which entry of :data:`LAYER_PATHS` a backend name runs."""
    return "literal" if backend in LITERAL_BACKENDS else "fast"


def model_backend_choices() -> tuple:
    """The names ``PromptedCLIP(backend=...)`` (and the trainer's and avstfp-predict's
    ``--backend``) accept: "literal", then every op backend and "auto"."""
    return (LITERAL_BACKEND,) + backend_choices()


def check_model_backend(name, arg: str = "backend") -> str:
    """``name`` if it is one of :func:`model_backend_choices`, else a ValueError naming
    ``arg``."""
    choices = model_backend_choices()
    if not isinstance(name, str) or name not in choices:
        raise ValueError(f"{arg}: expected one of {choices}, got {name!r}")
    return name


class PromptedCLIP(nn.Module):
    def __init__(self, model: Union[str, nn.Module] = "ViT-B-16", *, pretrained: Optional[str] = None,
                 backend: str = "auto", config: Optional[AVSTFPConfig] = None, device=None,
                 **config_kw):
        super().__init__()
        if config is None:
            config = AVSTFPConfig(**config_kw)
        elif config_kw:
            raise TypeError(f"pass either config= or keyword switches, not both: {sorted(config_kw)}")
        self.config = config
        if isinstance(model, str):
            visual = bb.load_visual(model, pretrained, device)
            self.model_name = model
        elif isinstance(model, nn.Module):
            if pretrained is not None:
                raise ValueError("pretrained: only with a model name; the given module "
                                 "already carries its weights")
            visual = getattr(model, "visual", model)    # a CLIP model or its tower: shared
            bb.check_visual(visual)
            # an open_clip tower records its open_clip name (prompt files need it to be
            # rebuilt); else the name of the one open_clip configuration it matches
            self.model_name = bb.open_clip_name_of(visual) or type(visual).__name__
        else:
            raise TypeError(f"model: expected an open_clip model name or nn.Module, got "
                            f"{type(model).__name__}")
        self.visual = visual
        blocks = visual.transformer.resblocks
        L, D = len(blocks), visual.conv1.out_channels
        self.num_layers, self.width, self.num_heads = L, D, blocks[0].attn.num_heads
        c = config
        dev = visual.conv1.weight.device

        def prompts(n):
            if n == 0:
                return None
            return nn.Parameter(torch.randn(L, n, D, device=dev) * c.prompt_init_std)

        def gate():
            return nn.Parameter(torch.full((L,), float(c.beta_init), device=dev))

        def add(kind, m, n, on):
            self.register_parameter(PromptKey(kind, m).param_name, prompts(n) if on else None)

        for m in ("audio", "visual"):          # registration order = state_dict order
            on = m in c.modalities
            t = on and c.has("temporal")
            add(PromptKind.TEMPORAL_KEY, m, c.n_temporal, t)
            add(PromptKind.TEMPORAL_VALUE, m, c.n_temporal, t)
            self.register_parameter(f"beta_{m}", gate() if t else None)
            add(PromptKind.SPATIAL, m, c.n_spatial, on and c.has("spatial"))
        add(PromptKind.FUSION, None, c.n_fusion, c.has("fusion"))
        self.register_parameter("beta_fusion", gate() if c.has("fusion") else None)

        self.head = None
        if c.task is not None:
            feat = D * len(c.modalities)
            self.head = nn.Sequential(nn.Linear(feat, c.head_hidden), nn.ReLU(),
                                      nn.Linear(c.head_hidden, c.num_classes)).to(dev)
        self.visual.requires_grad_(c.full_finetune)
        self.backend = "auto"
        self.set_backend(backend)

    # ------------------------------------------------------------------ construction
    @classmethod
    def tiny(cls, *, width: int = 64, layers: int = 2, heads: int = 2, patch_size: int = 16,
             image_size: int = 64, quick_gelu: bool = False, backend: str = "auto", **config_kw):
        """A random tiny tower (for CPU tests, demos and the synthetic task)."""
        visual = bb.tiny_visual(width, layers, heads, patch_size, image_size, quick_gelu)
        return cls(visual, backend=backend, **config_kw)

    def set_backend(self, backend: str) -> "PromptedCLIP":
        check_model_backend(backend)
        # Import lazily registered (kernel) backends now, outside any torch.compile region
        # (a lazy import while tracing would break the graph).
        if backend == AUTO:
            for name in backend_names():
                try:
                    get_backend(name)
                except ImportError:
                    pass
        elif backend != LITERAL_BACKEND:    # the literal layers call no op backend
            try:
                get_backend(backend)
            except ImportError as e:
                raise ValueError(f"backend: {backend!r} is not available: {e}") from e
        self.backend = backend
        return self

    @property
    def layer_path(self) -> str:
        """"literal" or "fast": the layers the current backend runs (:data:`LAYER_PATHS`)."""
        return layer_path(self.backend)

    @property
    def image_size(self) -> int:
        return bb.image_size(self.visual)

    @property
    def patch_size(self) -> int:
        return bb.patch_size(self.visual)

    # ------------------------------------------------------------------ parameters
    def prompt_parameters(self):
        return [p for n, p in self.named_parameters() if not n.startswith(("visual.", "head."))]

    def param_groups(self, lr_prompts: float, lr_head: float, weight_decay: float = 0.0):
        """Optimizer groups: prompts+gates, head (and the tower when fully fine-tuned)."""
        groups = [{"name": "prompts", "params": self.prompt_parameters(), "lr": lr_prompts,
                   "weight_decay": weight_decay}]
        if self.head is not None:
            groups.append({"name": "head", "params": list(self.head.parameters()), "lr": lr_head,
                           "weight_decay": weight_decay})
        if self.config.full_finetune:
            groups.append({"name": "backbone", "params": list(self.visual.parameters()),
                           "lr": lr_prompts, "weight_decay": weight_decay})
        return [g for g in groups if g["params"]]

    def parameter_counts(self) -> dict:
        """Parameter numbers per group (:func:`avstfp_fast.models.summary.parameter_counts`)."""
        return summary.parameter_counts(self)

    def parameter_summary(self, print_it: bool = True) -> str:
        """The one-screen summary (:func:`avstfp_fast.models.summary.parameter_summary`),
        printed unless ``print_it=False``."""
        text = summary.parameter_summary(self)
        if print_it:
            print(text)
        return text

    # ------------------------------------------------------------------ forward
    def _check_inputs(self, audio, video):
        c = self.config
        for name, t, rank, need in (("audio", audio, 4, "audio" in c.modalities),
                                    ("video", video, 5, "visual" in c.modalities)):
            if not need:
                if t is not None:
                    raise ValueError(f"{name}: this model has modalities={c.modalities}; "
                                     f"pass {name}=None")
                continue
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
            if t.dim() != rank:
                want = "(B, M, T, F)" if name == "audio" else "(B, M, 3, S, S)"
                raise ValueError(f"{name}: expected shape {want}, got {tuple(t.shape)}")
            if not t.is_floating_point():
                raise TypeError(f"{name}: expected a floating tensor, got {t.dtype}")
        if video is not None:
            s = self.image_size
            if video.shape[2] != 3 or video.shape[3] != s or video.shape[4] != s:
                raise ValueError(f"video: expected (B, M, 3, {s}, {s}), got {tuple(video.shape)}")
        if audio is not None:
            ps = self.patch_size
            if audio.shape[2] < ps or audio.shape[3] < ps:
                raise ValueError(f"audio: each segment must be at least {ps}x{ps} (one patch), "
                                 f"got {tuple(audio.shape)}")
        if audio is not None and video is not None:
            if audio.shape[:2] != video.shape[:2]:
                raise ValueError(f"audio/video: batch and segment dims must match: audio "
                                 f"{tuple(audio.shape)} (B, M)={tuple(audio.shape[:2])}, video "
                                 f"{tuple(video.shape)} (B, M)={tuple(video.shape[:2])}")
            if audio.device != video.device:
                raise ValueError(f"audio/video: on different devices ({audio.device}, {video.device})")

    def encode(self, audio: Optional[torch.Tensor], video: Optional[torch.Tensor],
               *, tokens: bool = False) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(B, M, T, F) fbank and (B, M, 3, S, S) frames -> A_feat, V_feat, (B, M, D) each.

        ``tokens=True``: the final ln_post-normalised tokens instead, (B, M, N_m, D) per
        modality with CLS at row 0 (so ``[:, :, 0]`` is the feature above and
        ``[:, :, 1:]`` are the patch tokens); on the fast path these are views into one
        LayerNorm output of the joint buffer.
        """
        self._check_inputs(audio, video)
        a = bb.embed_audio(self.visual, audio) if audio is not None else None
        v = bb.embed_video(self.visual, video) if video is not None else None
        return LAYER_PATHS[self.layer_path](self, a, v, self.backend, tokens)

    def forward(self, audio: Optional[torch.Tensor], video: Optional[torch.Tensor] = None):
        a, v = self.encode(audio, video)
        if self.head is None:
            return a, v
        feat = torch.cat([f for f in (a, v) if f is not None], dim=-1)    # (B, M, 2D)
        if self.config.task == "avar":
            feat = feat.mean(dim=1)                                         # clip level
        return self.head(feat)

    # ------------------------------------------------------------------ per-layer params
    def layer_prompts(self, layer: int, key: PromptKey) -> Optional[torch.Tensor]:
        """The prompts ``key`` of one layer, (n, D), or None when absent/zero."""
        p = getattr(self, key.param_name)
        return None if p is None else p[layer]

    # ------------------------------------------------------------------ prompt files
    #: The hook through which a subclass rebuilds itself from a prompt file: the name its
    #: files record (``model_class``; a file loads only onto the same kind) and
    #: :meth:`prompt_file_init`, its extra constructor keywords.
    prompt_file_kind = "PromptedCLIP"

    def prompt_file_init(self) -> dict:
        """JSON-able constructor keywords beyond the tower and ``config`` that rebuild
        this model (recorded as ``model_init``; ``from_prompts`` passes them to ``cls``).
        A subclass with more constructor arguments returns them here."""
        return {}

    def save_prompts(self, path: str, **kw) -> str:
        """Write prompts, gates and head (everything when fully fine-tuned) as a
        safetensors prompt file; see ``models/prompt_file.py`` for options and format."""
        from .prompt_file import save_prompts
        return save_prompts(self, path, **kw)

    @classmethod
    def from_prompts(cls, path: str, **kw) -> "PromptedCLIP":
        """Build a model from a prompt file onto ``backbone=`` (default: the file's) with
        ``pretrained=`` weights; refuses a different backbone or configuration."""
        from .prompt_file import from_prompts
        return from_prompts(cls, path, **kw)


class ReferenceAVSTFP(PromptedCLIP):
    """``PromptedCLIP`` pinned to the literal layers (backend "literal"); same state_dict."""

    def __init__(self, *args, **kw):
        kw.setdefault("backend", LITERAL_BACKEND)
        super().__init__(*args, **kw)
