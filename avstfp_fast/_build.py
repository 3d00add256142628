"""Build settings of the CUDA extension ``avstfp_fast._C``, shared by setup.py and the JIT path.

setup.py loads this file by path (the package is not importable at build time) and calls
:func:`cuda_extension`; :mod:`avstfp_fast.ops.cuda_backend` calls :func:`jit_load` when the
extension was not installed.  Both compile the same sources with the same flags:

- sources: ``csrc/*.cu`` (kernels, no torch headers) + ``csrc/binding.cpp`` (torch ops),
  found in the installed package (``avstfp_fast/csrc``) or the source tree (:data:`CSRC`);
- architectures: ``AVSTFP_CUDA_ARCHS`` (e.g. ``"80;90a"``), else ``TORCH_CUDA_ARCH_LIST``
  (e.g. ``"8.0;9.0a"``; ``+PTX`` adds PTX of that arch), else sm_80 (+PTX) and sm_90a.  The
  explicit ``-gencode`` flags stop torch from adding its own guess;
- ninja, ``MAX_JOBS`` parallel compiles (torch reads it);
- ``CUDA_HOME``: if unset, ``/usr/local/cuda`` when it has nvcc (torch otherwise guesses
  from the ``nvcc`` on PATH, which may be a wrapper outside the toolkit, and then fails to
  link ``-lcudart``).
"""
from __future__ import annotations

import glob
import hashlib
import os
from typing import List, Tuple

_PKG = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(_PKG)
# The CUDA sources: shipped inside an installed wheel as avstfp_fast/csrc (see setup.py);
# in a source tree (setup.py, editable installs) the top-level csrc/.
CSRC = (os.path.join(_PKG, "csrc") if os.path.isdir(os.path.join(_PKG, "csrc"))
        else os.path.join(ROOT, "csrc"))
EXT_NAME = "avstfp_fast._C"
JIT_NAME = "avstfp_fast_C"
# sm_80 SASS (runs on 8.x), sm_90a SASS (H100/H200), and compute_80 PTX so that newer
# GPUs can JIT the kernels instead of failing with "no kernel image".
DEFAULT_ARCHS = ("80+PTX", "90a")


def ensure_cuda_home() -> str | None:
    """Set CUDA_HOME to /usr/local/cuda when unset and that toolkit exists; return it."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home and os.path.exists("/usr/local/cuda/bin/nvcc"):
        home = "/usr/local/cuda"
        os.environ["CUDA_HOME"] = home
    return home


def nvcc_path() -> str | None:
    """The nvcc that would be used, or None."""
    home = ensure_cuda_home()
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    import shutil
    return shutil.which("nvcc")


def archs() -> List[str]:
    """Target architectures as nvcc names ("80", "90a", "86+PTX")."""
    raw = os.environ.get("AVSTFP_CUDA_ARCHS", "").strip()
    if raw:
        items = raw.replace(",", ";").replace(" ", ";").split(";")
        return [a.strip().replace("sm_", "").replace(".", "") for a in items if a.strip()]
    raw = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if raw:
        out = []
        for a in raw.replace(",", ";").replace(" ", ";").split(";"):
            a = a.strip()
            if a:
                out.append(a.replace(".", ""))
        return out
    return list(DEFAULT_ARCHS)


def arch_flags() -> List[str]:
    """-gencode flags for :func:`archs` (compute capability < 8.0 is rejected)."""
    flags = []
    for a in archs():
        ptx = a.endswith("+PTX")
        a = a[:-4] if ptx else a
        num = int("".join(ch for ch in a if ch.isdigit()) or 0)
        if num < 80:
            raise ValueError(f"CUDA arch {a!r}: the kernels need compute capability >= 8.0 "
                             "(set AVSTFP_CUDA_ARCHS, e.g. '80;90a')")
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        if ptx:
            flags += ["-gencode", f"arch=compute_{a},code=compute_{a}"]
    return flags


def nvcc_flags() -> List[str]:
    return ["-O3", "-std=c++17", "-lineinfo", *arch_flags()]


def cxx_flags() -> List[str]:
    # no -std here: torch picks the C++ standard its headers need (C++20 for torch >= 2.10)
    return ["-O3"]


def sources(absolute: bool = False) -> List[str]:
    cu = sorted(glob.glob(os.path.join(CSRC, "*.cu")))
    files = cu + [os.path.join(CSRC, "binding.cpp")]
    if absolute:
        return files
    return [os.path.relpath(f, ROOT) for f in files]


def _torch_cuda_home():
    """Import torch's cpp_extension with a usable CUDA_HOME.  torch computes it once, at
    import; if that happened before :func:`ensure_cuda_home` (setup.py imports it first)
    and the guess has no CUDA headers, correct the module's value."""
    ensure_cuda_home()
    from torch.utils import cpp_extension
    home = os.environ.get("CUDA_HOME")
    cur = cpp_extension.CUDA_HOME
    if home and (cur is None or not os.path.exists(os.path.join(cur, "include", "cuda_runtime.h"))):
        cpp_extension.CUDA_HOME = home
    return cpp_extension


def cuda_extension() -> Tuple[list, dict]:
    """(ext_modules, cmdclass) for setup.py: the CUDAExtension built with ninja."""
    cpp_extension = _torch_cuda_home()
    BuildExtension, CUDAExtension = cpp_extension.BuildExtension, cpp_extension.CUDAExtension
    ext = CUDAExtension(
        name=EXT_NAME,
        sources=sources(absolute=False),
        include_dirs=[CSRC],
        extra_compile_args={"cxx": cxx_flags(), "nvcc": nvcc_flags()},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


def build_dir() -> str:
    """JIT build folder: AVSTFP_BUILD_DIR, else ~/.cache/avstfp_fast/<key>, where the key
    hashes torch's version, the flags and the sources (a change rebuilds)."""
    import torch
    h = hashlib.sha256()
    h.update(torch.__version__.encode())
    h.update(" ".join(nvcc_flags() + cxx_flags()).encode())
    for f in sources(absolute=True) + sorted(glob.glob(os.path.join(CSRC, "*.h")) + glob.glob(os.path.join(CSRC, "*.cuh"))):
        with open(f, "rb") as fh:
            h.update(fh.read())
    base = os.environ.get("AVSTFP_BUILD_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "avstfp_fast")
    d = os.path.join(base, f"jit_{h.hexdigest()[:16]}")
    os.makedirs(d, exist_ok=True)
    return d


def jit_load(verbose: bool = False):
    """Compile (first time, a few minutes) and load the extension with ninja."""
    cpp_extension = _torch_cuda_home()
    return cpp_extension.load(
        name=JIT_NAME,
        sources=sources(absolute=True),
        extra_include_paths=[CSRC],
        extra_cflags=cxx_flags(),
        extra_cuda_cflags=nvcc_flags(),
        build_directory=build_dir(),
        with_cuda=True,
        verbose=verbose,
    )
