"""Data: AVE and Kinetics-Sounds readers, PyAV decoding, the front end, and loaders.

AVE layout (``<data-root>``)::

    Annotations.txt                      Category&VideoID&Quality&StartTime&EndTime
    trainSet.txt / valSet.txt / testSet.txt   (same '&' format, one row per clip)
    AVE/<VideoID>.mp4

The header row is optional in every one of these files and is detected, never assumed:
skipping a first row that is data (or keeping a header as data) shifts the whole table by
one row, a classic trap with this data set.  Categories are the sorted distinct
categories of ``Annotations.txt``; background is the LAST class index (28 for AVE).
Segment ``s`` (covering ``[s, s+1)`` seconds) carries the clip's category when
``StartTime <= s < EndTime``, background otherwise.

Kinetics-Sounds layout: ``<data-root>/{train,val,test}.csv`` with rows ``video,label``
(optional header); video paths are relative to ``<data-root>`` (or absolute); labels are
class names or integer ids.  Class names come from ``<data-root>/classes.txt`` when
present (one per line, in id order), else the sorted distinct labels of all splits.

Decoding (PyAV): the first ``clip_seconds`` (10 s) of the file; one RGB frame per segment
(the decoded frame nearest to the segment's centre) and 16 kHz mono audio, zero-padded
when the stream ends a little early.  Unreadable, truncated (less than half of the clip)
or silent files raise :class:`BadSample`; the dataset turns that into ``None`` with a
warning, and :func:`collate_skip_bad` drops those samples and counts them.
"""
from __future__ import annotations

import csv
import logging
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

from ..data.media import MIN_COVERAGE, SILENCE_PEAK, BadSample, decode_clip  # noqa: F401

log = logging.getLogger("avstfp_fast.train")

__all__ = ["BadSample", "AVERow", "read_ave_rows", "ave_categories", "ave_segment_labels",
           "read_ks_rows", "decode_clip", "ClipDataset", "collate_skip_bad",
           "ResumableDistributedSampler", "ShardSampler", "AVE_HEADER", "ave_items",
           "ave_splits", "ks_items", "ks_splits"]

AVE_HEADER = ("Category", "VideoID", "Quality", "StartTime", "EndTime")


# --------------------------------------------------------------------------------------
# AVE annotations
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AVERow:
    category: str
    video_id: str
    quality: str
    start: int
    end: int


def _is_ave_header(fields: list[str]) -> bool:
    if [f.strip().lower() for f in fields] == [h.lower() for h in AVE_HEADER]:
        return True
    if len(fields) == 5:
        try:
            int(float(fields[3])), int(float(fields[4]))
            return False
        except ValueError:
            return True      # non-numeric times in the first row: a header of some kind
    return False


def read_ave_rows(path: str) -> list[AVERow]:
    """Parse an AVE '&' file (Annotations.txt or a split file), header detected."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"AVE annotation file not found: {path}")
    rows: list[AVERow] = []
    with open(path, encoding="utf-8-sig") as f:
        lines = [ln.rstrip("\r\n") for ln in f]
    first = True
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        fields = line.split("&")
        if first:
            first = False
            if _is_ave_header(fields):
                continue
        if len(fields) != 5:
            raise ValueError(f"{path}:{lineno}: expected 5 '&'-separated fields "
                             f"{'&'.join(AVE_HEADER)}, got {len(fields)}: {line!r}")
        cat, vid, quality, start, end = (x.strip() for x in fields)
        try:
            s, e = int(round(float(start))), int(round(float(end)))
        except ValueError:
            raise ValueError(f"{path}:{lineno}: StartTime/EndTime must be numbers, got "
                             f"{start!r}/{end!r}") from None
        if not 0 <= s < e:
            raise ValueError(f"{path}:{lineno}: expected 0 <= StartTime < EndTime, got "
                             f"{s}..{e}")
        rows.append(AVERow(cat, vid, quality, s, e))
    return rows


def ave_categories(annotations_path: str) -> list[str]:
    """Event categories (sorted) followed by 'background' (the last class)."""
    cats = sorted({r.category for r in read_ave_rows(annotations_path)})
    if not cats:
        raise ValueError(f"{annotations_path}: no annotation rows")
    return cats + ["background"]


def ave_segment_labels(row: AVERow, class_index: dict[str, int], segments: int,
                       clip_seconds: float) -> np.ndarray:
    """Per-segment labels: the category where segment s lies in [start, end), else bg."""
    bg = len(class_index) - 1 if "background" not in class_index else class_index["background"]
    if row.category not in class_index:
        raise ValueError(f"category {row.category!r} of video {row.video_id} is not in "
                         f"Annotations.txt")
    seg_len = clip_seconds / segments
    lab = np.full(segments, bg, dtype=np.int64)
    for s in range(segments):
        t0 = s * seg_len
        if row.start <= t0 < row.end:
            lab[s] = class_index[row.category]
    return lab


# --------------------------------------------------------------------------------------
# Kinetics-Sounds CSV
# --------------------------------------------------------------------------------------
_KS_HEADER_WORDS = {"video", "path", "video_path", "file", "filename", "label", "class",
                    "category", "youtube_id"}


def read_ks_rows(path: str) -> list[tuple[str, str]]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Kinetics-Sounds split file not found: {path}")
    out = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        for i, rec in enumerate(csv.reader(f)):
            if not rec or not "".join(rec).strip():
                continue
            if i == 0 and rec[0].strip().lower() in _KS_HEADER_WORDS:
                continue
            if len(rec) < 2:
                raise ValueError(f"{path}:{i + 1}: expected 'video,label', got {rec!r}")
            out.append((rec[0].strip(), rec[1].strip()))
    return out


def ks_classes(root: str, splits: dict[str, str]) -> list[str]:
    cls_file = os.path.join(root, "classes.txt")
    if os.path.isfile(cls_file):
        with open(cls_file, encoding="utf-8") as f:
            return [ln.strip() for ln in f if ln.strip()]
    labels = set()
    for p in splits.values():
        if os.path.isfile(p):
            labels.update(lab for _, lab in read_ks_rows(p))
    if labels and all(lab.isdigit() for lab in labels):
        n = max(int(lab) for lab in labels) + 1
        return [str(i) for i in range(n)]
    return sorted(labels)


# --------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------
class ClipDataset(Dataset):
    """Clips -> dict(audio (M, T, F), video (M, 3, S, S), label, id) through the front end.

    ``items``: list of (path, label ndarray/int, id).  Keys may be plain indices or
    ``(index, seed)`` pairs; the seed drives the visual augmentation of that sample so
    that augmentations are reproducible whatever the worker layout.
    ``cache``: keep decoded audio features and raw frames in memory (per process).
    ``short``: what to do with a file shorter than the clip: ``"mark"`` (default: the
    padded segments are listed in the sample's ``padded``) or ``"skip"`` (a bad sample
    with the reason).  Each unreadable file is warned about once (``warn_bad=False``:
    never, for callers that report skipped files themselves).
    """

    def __init__(self, items, *, image_size: int, segments: int = 10,
                 clip_seconds: float = 10.0, sample_rate: int = 16000, augment=None,
                 cache: bool = False, short: str = "mark", warn_bad: bool = True):
        if short not in ("mark", "skip"):
            raise ValueError(f"short: expected 'mark' or 'skip', got {short!r}")
        self.short, self.warn_bad = short, warn_bad
        self._warned: set = set()
        self.items = list(items)
        self.image_size = int(image_size)
        self.segments = segments
        self.clip_seconds = clip_seconds
        self.sample_rate = sample_rate
        self.augment = augment
        self.cache = cache
        self._cache: dict[str, tuple] = {}      # by path: items may share a video

    def __len__(self):
        return len(self.items)

    def _decode(self, path, info=None):
        """(frames (segments, H, W, 3) uint8, wave) of one file (``info``: see
        :func:`decode_clip`); subclasses may sample the segments differently (e.g. AVQA:
        1-s segments every few seconds)."""
        return decode_clip(path, segments=self.segments, clip_seconds=self.clip_seconds,
                           sample_rate=self.sample_rate,
                           short_side=math.ceil(1.25 * self.image_size), info=info)

    def raw(self, idx):
        """``(audio features (M, T, F) float32, frames (M, 3, H, W) uint8, ...)`` of item
        ``idx`` (``_load``'s tuple): what the front end and augmentation start from
        (avstfp-prepare stores exactly this).  Raises BadSample."""
        return self._load(idx)

    def _load(self, idx):
        path = self.items[idx][0]
        if self.cache and path in self._cache:
            hit = self._cache[path]
            if isinstance(hit, BadSample):
                raise hit
            return hit
        from avstfp_fast import frontend
        info: dict = {}
        try:
            frames, wave = self._decode(path, info)
            padded = list(info.get("padded", []))
            if padded and self.short == "skip":
                raise BadSample(f"short: the media covers {info.get('media_seconds', 0):g} s "
                                f"of the {self.clip_seconds:g} s clip (segments {padded} "
                                f"would be padding)")
        except BadSample as e:
            if self.cache:
                self._cache[path] = e
            raise
        audio = frontend.audio_features(torch.from_numpy(wave), segments=self.segments)
        audio = audio.float().contiguous()
        frames_t = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()  # (M,3,H,W)
        out = (audio, frames_t, padded, info.get("media_seconds"))
        if self.cache:
            self._cache[path] = out
        return out

    def __getitem__(self, key):
        idx, seed = key if isinstance(key, tuple) else (key, None)
        path, label, vid = self.items[idx]
        try:
            audio, frames, padded, media = self._load(idx)
        except BadSample as e:
            if self.warn_bad and path not in self._warned:     # once per file
                self._warned.add(path)
                log.warning("skipping %s: %s", path, e)
            return {"bad": path, "reason": str(e)}
        from avstfp_fast import frontend
        if self.augment is not None and seed is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                frames = self.augment(frames)
        video = frontend.video_frames(frames, segments=self.segments, size=self.image_size)
        return {"audio": audio, "video": video.float().contiguous(),
                "label": torch.as_tensor(label, dtype=torch.long), "id": vid,
                "padded": padded, "media_seconds": media}


def collate_skip_bad(batch):
    """Stack the good samples; report the bad ones (``bad``: list of paths)."""
    good = [b for b in batch if b is not None and "bad" not in b]
    bad = [b["bad"] for b in batch if b is not None and "bad" in b]
    if not good:
        return {"audio": None, "video": None, "label": None, "id": [], "bad": bad,
                "padded": []}
    return {"audio": torch.stack([b["audio"] for b in good]),
            "video": torch.stack([b["video"] for b in good]),
            "label": torch.stack([b["label"] for b in good]),
            "id": [b["id"] for b in good], "bad": bad,
            "padded": [b.get("padded", []) for b in good],       # padding segments
            "media_seconds": [b.get("media_seconds") for b in good]}


# --------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------
class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler that can skip the first samples of an epoch (mid-epoch resume)
    and yields ``(index, seed)`` keys with a per-(epoch, index) augmentation seed."""

    def __init__(self, dataset, *, num_replicas: int, rank: int, seed: int,
                 shuffle: bool = True, drop_last: bool = False):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                         seed=seed, drop_last=drop_last)
        self.skip = 0

    def set_skip(self, n: int) -> None:
        self.skip = int(n)

    def __iter__(self):
        sizes = getattr(self.dataset, "shard_sizes", None)
        if sizes and self.shuffle:       # prepared shards: shuffle through a shard buffer
            order = shard_buffer_order(sizes, getattr(self.dataset, "shard_buffer", 4),
                                       self.seed, self.epoch)
            if self.drop_last:
                order = order[:self.total_size]
            else:
                order += (order * math.ceil(self.total_size / max(1, len(order))))[
                    :self.total_size - len(order)]
            idx = order[self.rank:self.total_size:self.num_replicas][self.skip:]
        else:
            idx = list(super().__iter__())[self.skip:]
        base = (self.seed * 1_000_003 + self.epoch * 7919) % (2 ** 31)
        return iter([(i, (base + i * 104_729) % (2 ** 31)) for i in idx])

    def __len__(self):
        return max(0, super().__len__() - self.skip)


def shard_buffer_order(shard_sizes, buffer: int, seed: int, epoch: int) -> list:
    """A permutation of ``range(sum(shard_sizes))`` (items numbered shard after shard)
    that reads ``buffer`` shards at a time: the shard order is shuffled, then the items
    of each group of ``buffer`` consecutive shards are shuffled together (the shuffle
    buffer of streaming loaders).  It depends on (seed, epoch) only, so it replays."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    starts = np.concatenate([[0], np.cumsum(shard_sizes)]).astype(np.int64)
    shards = torch.randperm(len(shard_sizes), generator=g).tolist()
    out: list = []
    for j in range(0, len(shards), max(1, int(buffer))):
        pool = np.concatenate([np.arange(starts[k], starts[k + 1])
                               for k in shards[j:j + buffer]])
        out += pool[torch.randperm(len(pool), generator=g).numpy()].tolist()
    return out


class ShardSampler(Sampler):
    """Deterministic evaluation shard: indices rank, rank + world, ... (no padding)."""

    def __init__(self, n: int, rank: int = 0, world: int = 1):
        self.n, self.rank, self.world = n, rank, world

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world))

    def __len__(self):
        return len(range(self.rank, self.n, self.world))


# --------------------------------------------------------------------------------------
# Split construction
# --------------------------------------------------------------------------------------
AVE_SPLIT_FILES = {"train": "trainSet.txt", "val": "valSet.txt", "test": "testSet.txt"}
KS_SPLIT_FILES = {"train": "train.csv", "val": "val.csv", "test": "test.csv"}


def ave_items(split_file: str, root: str, classes: list[str], *, segments: int = 10,
              clip_seconds: float = 10.0, video_dir: str = "AVE") -> list:
    """Dataset items ``(path, per-segment labels, video id)`` of one AVE split file."""
    index = {c: i for i, c in enumerate(classes)}
    return [(os.path.join(root, video_dir, r.video_id + ".mp4"),
             ave_segment_labels(r, index, segments, clip_seconds), r.video_id)
            for r in read_ave_rows(split_file)]


def ave_splits(root: str, *, segments: int = 10, clip_seconds: float = 10.0,
               video_dir: str = "AVE"):
    """Return (classes, {split: items}) for an AVE-layout folder."""
    classes = ave_categories(os.path.join(root, "Annotations.txt"))
    splits = {}
    for split, fname in AVE_SPLIT_FILES.items():
        p = os.path.join(root, fname)
        if os.path.isfile(p):
            splits[split] = ave_items(p, root, classes, segments=segments,
                                      clip_seconds=clip_seconds, video_dir=video_dir)
    if "train" not in splits:
        raise FileNotFoundError(f"{root}: no {AVE_SPLIT_FILES['train']}")
    return classes, splits


def ks_items(csv_file: str, root: str, classes: list[str]) -> list:
    """Dataset items ``(path, class id, video id)`` of one Kinetics-Sounds split file."""
    index = {c: i for i, c in enumerate(classes)}
    items = []
    for video, lab in read_ks_rows(csv_file):
        if lab not in index:
            raise ValueError(f"{csv_file}: label {lab!r} is not one of the {len(classes)} "
                             f"classes")
        full = video if os.path.isabs(video) else os.path.join(root, video)
        items.append((full, index[lab], os.path.splitext(os.path.basename(video))[0]))
    return items


def ks_splits(root: str):
    paths = {s: os.path.join(root, f) for s, f in KS_SPLIT_FILES.items()}
    classes = ks_classes(root, paths)
    splits = {split: ks_items(p, root, classes) for split, p in paths.items()
              if os.path.isfile(p)}
    if "train" not in splits:
        raise FileNotFoundError(f"{root}: no {KS_SPLIT_FILES['train']}")
    return classes, splits


# --------------------------------------------------------------------------------------
# Prepared shards (avstfp-prepare): the same items, read instead of decoded
# --------------------------------------------------------------------------------------
class PreparedMixin:
    """Loads an item's clip from its prepared shard (:class:`ClipRef` in the path
    column) instead of decoding a file; everything after (augmentation, front end,
    collation) is the decode path's.  A damaged sample is a BadSample (skipped and
    counted); items whose clip was not prepared (listed as bad when preparing) too."""
    shard_buffer = 4

    def _load(self, idx):
        from ..data.shards import read_clip
        ref = self.items[idx][0]
        if not hasattr(ref, "members"):
            raise BadSample(f"not in the prepared shards ({ref})")
        # extra: what the decoder reported (padded segments, media seconds); shards made
        # before the decoder reported them hold nothing: no padding known
        return read_clip(ref) + (tuple(ref.extra) or ((), None))


class PreparedClipDataset(PreparedMixin, ClipDataset):
    """:class:`ClipDataset` over prepared shards: ``refs`` is ``split_refs`` output."""

    def __init__(self, refs, shard_sizes, **kw):
        kw["cache"] = False
        super().__init__([(r, _label(m["label"]), m["id"]) for r, m in refs], **kw)
        self.shard_sizes = list(shard_sizes)

    @classmethod
    def from_items(cls, items, **kw):
        """Over ``(ClipRef, label, id)`` items in any order (e.g. avstfp-predict's)."""
        self = cls.__new__(cls)
        ClipDataset.__init__(self, items, **{**kw, "cache": False})
        self.shard_sizes = []
        return self


def _label(x):
    return np.asarray(x, dtype=np.int64) if isinstance(x, list) else int(x)


def prepared_splits(root: str, layout: str, **settings):
    """``(manifest, classes, {split: (refs, shard sizes)})`` of a prepared folder, after
    checking that it was prepared from a ``layout`` data set with ``settings``."""
    from ..data.shards import check_settings, load_manifest, split_refs
    man = load_manifest(root)
    check_settings(man, root, layout=layout, **settings)
    splits = {}
    for split, info in man["splits"].items():
        splits[split] = (split_refs(root, man, split), [s["clips"] for s in info["shards"]])
        if info.get("bad"):
            log.warning("prepared %s: %d of %d source files were skipped when preparing "
                        "(listed in %s)", split, info["bad"], info["sources"],
                        os.path.join(root, "bad.jsonl"))
    return man, list(man["classes"]), splits
