"""Names shared by the benchmark cases and the report (standard library only, so that
summarize.py runs without torch)."""
from __future__ import annotations

OURS = ("ours-triton", "ours-cuda")          # our kernel backends
PEERS = ("sdpa", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "xformers-cat",
         "xformers-split", "flex", "naive")   # other implementations of the same op
# every kernel contender, in report column order ("ours-torch": our pure PyTorch backend)
CONTENDERS = OURS + ("ours-torch",) + PEERS
