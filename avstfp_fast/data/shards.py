"""Prepared data: WebDataset-format tar shards of decoded clips, and their manifest.

Layout of a prepared folder (``avstfp-prepare --out DIR``)::

    DIR/manifest.json                  source, settings, library version, classes, splits
    DIR/<split>/shard-000000.tar       WebDataset shards (plain POSIX tar)
    DIR/<split>/shard-000000.json      per-shard record (clips, skipped files, sha256)
    DIR/bad.jsonl                      every skipped source file with its reason
    DIR/questions/avqa-*.json          AVQA only: the official question files, unchanged

A sample is a group of tar members sharing one key (``000123`` = its position in the
split), as WebDataset groups them:

* ``<key>.frames.npy`` -- uint8 ``(M, H, W, 3)``: the decoded frame of each segment at
  the decode path's size (short side ``short_side`` = ceil(1.25 x image size), never
  upscaled), **bit-exact** with decoding; or ``<key>.fNN.jpg`` (one JPEG per segment)
  with ``--frames jpeg``: 5-20x smaller, pixels within JPEG error (quality 95: mean
  |difference| about 1/255, see docs/data.md);
* ``<key>.fbank.npy`` -- ``(M, 98, 128)`` normalised fbank in float16 (default; within
  fp16 rounding, relative error <= 2^-11, of the decode path's float32) or float32
  (``--audio-dtype float32``: bit-exact);
* ``<key>.json`` -- ``id``, ``label`` (class id, or per-segment ids), ``source`` (the
  decoded file), ``padded``/``media_seconds`` when the decoder reports them (segments
  that are padding of a short file), and a CRC-32 of each array member, checked at every
  read (a damaged sample is skipped and counted like an unreadable video, never used).

Reading (:func:`scan_shard`, :func:`read_clip`) is random access through the member
offsets, so the trainer's samplers split samples across DDP ranks and loader workers
exactly as they split files.  The shards are also plain WebDataset input
(``webdataset.WebDataset(urls)``) for streaming pipelines.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tarfile
import zlib
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .media import BadSample

__all__ = ["FORMAT", "MANIFEST", "PreparedSettings", "ClipRef", "ShardWriter",
           "encode_sample", "scan_shard", "read_clip", "load_manifest", "check_settings",
           "shard_name", "sha256_file", "PreparedDataError"]

FORMAT = "avstfp-prepared/1"
MANIFEST = "manifest.json"
_MTIME = 0            # fixed member times: the same clips give the same bytes


class PreparedDataError(ValueError):
    """A prepared folder that cannot be used as asked (one line, names what differs)."""


@dataclass(frozen=True)
class PreparedSettings:
    """What the prepared tensors depend on; the trainer refuses a mismatch."""
    layout: str                   # "ave" (AVE and synthetic), "ks" or "avqa"
    segments: int = 10
    clip_seconds: float = 10.0
    sample_rate: int = 16000
    image_size: int = 224
    short_side: int = 280         # ceil(1.25 * image_size): the decode path's frame size
    frames: str = "npy"           # "npy" (bit-exact) or "jpeg"
    jpeg_quality: int = 95
    audio_dtype: str = "float16"  # or "float32" (bit-exact)
    avqa_hop: Optional[int] = None

    def __post_init__(self):
        if self.frames not in ("npy", "jpeg"):
            raise ValueError(f"frames: expected 'npy' or 'jpeg', got {self.frames!r}")
        if self.audio_dtype not in ("float16", "float32"):
            raise ValueError(f"audio_dtype: expected 'float16' or 'float32', got "
                             f"{self.audio_dtype!r}")
        if not 1 <= int(self.jpeg_quality) <= 100:
            raise ValueError(f"jpeg_quality: expected 1..100, got {self.jpeg_quality}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ClipRef:
    """Where one prepared clip lies: shard file, key, and (offset, size) per member."""
    shard: str
    key: str
    members: tuple                # ((suffix, offset, size), ...)
    frames: str = "npy"
    crc: tuple = ()               # ((suffix, CRC-32), ...) recorded when written
    source: str = ""              # the file it was decoded from
    extra: tuple = ()             # (padded segments, media seconds) when recorded

    def __str__(self):            # shown in skip messages, like a video path
        return f"{self.shard}#{self.key}"


def shard_name(index: int) -> str:
    return f"shard-{index:06d}"


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def encode_sample(audio, frames, meta: dict, settings: PreparedSettings) -> dict:
    """Members of one sample: ``{suffix: bytes}``.  ``audio``: (M, T, F) float features;
    ``frames``: (M, 3, H, W) or (M, H, W, 3) uint8."""
    audio = np.asarray(audio, dtype=np.dtype(settings.audio_dtype))
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4:
        raise ValueError(f"frames: expected uint8 (M, 3, H, W), got {frames.dtype} "
                         f"{frames.shape}")
    if frames.shape[1] == 3 and frames.shape[-1] != 3:
        frames = frames.transpose(0, 2, 3, 1)
    out = {"fbank.npy": _npy_bytes(audio)}
    if settings.frames == "npy":
        out["frames.npy"] = _npy_bytes(frames)
    else:
        from PIL import Image
        for i, fr in enumerate(frames):
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(fr)).save(
                buf, format="JPEG", quality=int(settings.jpeg_quality), subsampling=0)
            out[f"f{i:02d}.jpg"] = buf.getvalue()
    crc = {k: zlib.crc32(v) for k, v in out.items()}
    out["json"] = json.dumps({**meta, "crc32": crc}, sort_keys=True).encode()
    return out


class ShardWriter:
    """Write samples into ``path`` through ``path.tmp`` (renamed on close: a shard file
    that exists is complete)."""

    def __init__(self, path: str):
        self.path = path
        self.tmp = path + ".tmp"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)
        self.count = 0

    def write(self, key: str, members: dict) -> None:
        for suffix, data in members.items():
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size, info.mtime, info.mode = len(data), _MTIME, 0o444
            info.uname = info.gname = "avstfp"
            self.tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def close(self) -> None:
        self.tar.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.tar.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


def scan_shard(path: str, frames: str = "npy") -> list:
    """``[(ClipRef, meta dict)]`` of one shard, in file order.  A damaged or truncated
    shard raises :class:`PreparedDataError` naming it."""
    if not os.path.isfile(path):
        raise PreparedDataError(f"prepared shard missing: {path} (listed in the manifest; "
                                f"re-run avstfp-prepare with the same --out to rebuild it)")
    groups: dict = {}
    order: list = []
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                key, _, suffix = m.name.partition(".")
                if key not in groups:
                    groups[key] = {}
                    order.append(key)
                if suffix == "json":
                    groups[key]["json"] = json.loads(tar.extractfile(m).read())
                else:
                    groups[key][suffix] = (m.offset_data, m.size)
    except (tarfile.TarError, OSError, ValueError, EOFError) as e:
        raise PreparedDataError(f"corrupt prepared shard {path}: {type(e).__name__}: {e} "
                                f"(check it with avstfp-prepare --verify; re-run "
                                f"avstfp-prepare to rebuild it)") from None
    out = []
    for key in order:
        g = groups[key]
        meta = g.pop("json", None)
        if meta is None or "fbank.npy" not in g:
            raise PreparedDataError(f"corrupt prepared shard {path}: sample {key!r} lacks "
                                    f"its {'json' if meta is None else 'fbank.npy'} member")
        members = tuple(sorted((s, o, n) for s, (o, n) in g.items()))
        crc = tuple(sorted((meta.get("crc32") or {}).items()))
        extra = ((tuple(meta["padded"]), meta.get("media_seconds"))
                 if "padded" in meta else ())
        out.append((ClipRef(path, key, members, frames, crc, str(meta.get("source", "")),
                            extra), meta))
    return out


_FILES: dict = {}        # (pid, path) -> open file: one handle per shard per process


def _read(path: str, offset: int, size: int) -> bytes:
    key = (os.getpid(), path)
    f = _FILES.get(key)
    if f is None:
        if len(_FILES) > 64:
            for k in [k for k in _FILES if k[0] == os.getpid()][:32]:
                _FILES.pop(k).close()
        f = _FILES[key] = open(path, "rb")
    f.seek(offset)
    data = bytearray(size)                # writable: arrays view it without a copy
    if f.readinto(data) != size:
        raise BadSample(f"prepared shard truncated at {path}:{offset}")
    return data


def _npy_view(data: bytearray) -> np.ndarray:
    """The array of an .npy member, viewing ``data`` (np.load would copy it)."""
    fmt = np.lib.format
    buf = io.BytesIO(data)
    version = fmt.read_magic(buf)
    read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
    shape, fortran, dtype = read(buf)
    if fortran or dtype.hasobject:
        raise BadSample("unexpected array layout in a prepared sample")
    count = int(np.prod(shape)) if shape else 1
    return np.frombuffer(data, dtype=dtype, count=count, offset=buf.tell()).reshape(shape)


def read_clip(ref: ClipRef):
    """``(audio (M, T, F) float32 tensor, frames (M, 3, H, W) uint8 tensor)`` of one
    prepared clip; a member whose CRC-32 differs from the recorded one raises
    :class:`BadSample`."""
    import torch
    raw = {}
    crc = dict(ref.crc)
    for suffix, off, size in ref.members:
        data = _read(ref.shard, off, size)
        if zlib.crc32(data) != crc.get(suffix):
            raise BadSample(f"damaged prepared sample ({suffix}: CRC-32 mismatch)")
        raw[suffix] = data
    try:
        audio = torch.from_numpy(_npy_view(raw.pop("fbank.npy"))).float()
        fr = _npy_view(raw["frames.npy"]) if "frames.npy" in raw else None
    except ValueError as e:
        raise BadSample(f"unreadable prepared sample ({e})") from None
    if fr is None:
        from PIL import Image
        fr = np.stack([np.asarray(Image.open(io.BytesIO(raw[k])).convert("RGB"))
                       for k in sorted(raw) if k.endswith(".jpg")])
    frames = torch.from_numpy(fr).permute(0, 3, 1, 2).contiguous()   # copies: the
    return audio.contiguous(), frames                                 # buffer is freed


def load_manifest(root: str) -> dict:
    path = os.path.join(root, MANIFEST)
    if not os.path.isfile(path):
        raise PreparedDataError(f"prepared data: no {MANIFEST} in {root} (prepare it with "
                                f"avstfp-prepare, or point --data-root at the videos)")
    try:
        with open(path, encoding="utf-8") as f:
            man = json.load(f)
    except ValueError as e:
        raise PreparedDataError(f"prepared data: {path} is not valid JSON ({e})") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        raise PreparedDataError(f"prepared data: {path} has format "
                                f"{(man or {}).get('format')!r}, expected {FORMAT!r}")
    return man


def is_prepared(root: Optional[str]) -> bool:
    return bool(root) and os.path.isfile(os.path.join(root, MANIFEST))


def check_settings(man: dict, root: str, **want) -> None:
    """Refuse (one line) a manifest whose settings differ from what the run asks for."""
    have = man.get("settings", {})
    diff = [f"{k}: prepared {have.get(k)!r}, run needs {v!r}" for k, v in want.items()
            if v is not None and have.get(k) != v
            and not (isinstance(v, float) and have.get(k) == float(v))]
    if diff:
        raise PreparedDataError(f"prepared data {root} does not match this run ("
                                + "; ".join(diff) + "); prepare it again with matching "
                                "options (avstfp-prepare --help)")


def split_refs(root: str, man: dict, split: str) -> list:
    """``[(ClipRef, meta)]`` of one split in manifest order.  Shard files present but not
    in the manifest are refused (one line) rather than silently left out."""
    info = man["splits"][split]
    frames = man["settings"].get("frames", "npy")
    listed = [s["name"] for s in info["shards"]]
    folder = os.path.join(root, split)
    if os.path.isdir(folder):
        extra = sorted(f for f in os.listdir(folder)
                       if f.endswith(".tar") and f"{split}/{f}" not in listed)
        if extra:
            raise PreparedDataError(f"prepared data {root}: {split}/ holds shards the "
                                    f"manifest does not list: {extra[:5]} (an interrupted "
                                    f"or mixed preparation; re-run avstfp-prepare to "
                                    f"finish it)")
    out = []
    for s in info["shards"]:
        path = os.path.join(root, s["name"])
        if os.path.isfile(path) and os.path.getsize(path) != s["bytes"]:
            raise PreparedDataError(f"corrupt prepared shard {path}: {os.path.getsize(path)} "
                                    f"bytes, the manifest says {s['bytes']} (re-run "
                                    f"avstfp-prepare to rebuild it)")
        got = scan_shard(path, frames)
        if len(got) != s["clips"]:
            raise PreparedDataError(f"corrupt prepared shard {path}: {len(got)} clips, the "
                                    f"manifest says {s['clips']}")
        out += got
    return out
