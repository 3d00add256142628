"""A regular (non-editable) install carries the CUDA sources: build the sdist, build the
wheel from it, install the wheel into a fresh virtual environment and check there that the
extension's JIT path finds every source and header inside site-packages.

Cheap: no download and no torch install (the fresh environment reaches this interpreter's
packages through a .pth line), AVSTFP_NO_CUDA=1 (nothing compiled at install), and the JIT
build is stopped at ``cpp_extension.load``, whose arguments are checked; with nvcc present
each installed ``.cu`` file is also preprocessed (``nvcc -E``) to prove its includes resolve.
"""
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in", "avstfp_fast", "kernels",
           "csrc")

CHECK = r"""
import glob, json, os, sys, sysconfig
import avstfp_fast
from avstfp_fast import _build
site = os.path.realpath(sysconfig.get_paths()["purelib"])
inside = lambda f: os.path.realpath(f).startswith(site + os.sep)
srcs = _build.sources(absolute=True)
headers = sorted(glob.glob(os.path.join(_build.CSRC, "*.h")) + glob.glob(os.path.join(_build.CSRC, "*.cuh")))
from torch.utils import cpp_extension
seen = {}
cpp_extension.load = lambda **kw: seen.update(kw)     # stop the JIT build at the compiler
_build.jit_load()
print(json.dumps(dict(package=avstfp_fast.__file__, package_inside=inside(avstfp_fast.__file__),
                      csrc=_build.CSRC, sources=srcs, headers=headers,
                      all_inside=all(inside(f) and os.path.isfile(f) for f in srcs + headers),
                      jit_sources=seen.get("sources"), jit_includes=seen.get("extra_include_paths"),
                      build_dir=seen.get("build_directory"))))
"""


def _run(cmd, cwd, env):
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{cmd} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def _nvcc():
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    path = os.path.join(home, "bin", "nvcc")
    return path if os.path.exists(path) else shutil.which("nvcc")


def test_wheel_ships_the_cuda_sources_and_the_jit_path_finds_them(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info", "build")
    for name in SHIPPED:
        p = ROOT / name
        (shutil.copytree(p, src / name, ignore=ignore) if p.is_dir() else shutil.copy2(p, src / name))
    env = dict(os.environ, AVSTFP_NO_CUDA="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PYTHONPATH", None)
    cu_files = sorted(p.name for p in (ROOT / "csrc").iterdir()
                      if p.suffix in (".cu", ".cuh", ".h", ".cpp"))

    # sdist: csrc/ at its top, as setup.py expects when building from it
    _run([sys.executable, "-c", "from setuptools import build_meta as b; b.build_sdist('../dist')"],
         src, env)
    (sdist,) = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(sdist) as t:
        names = {Path(n).relative_to(Path(n).parts[0]).as_posix() for n in t.getnames() if "/" in n}
    assert {f"csrc/{f}" for f in cu_files} <= names

    # wheel built from the sdist: csrc/ inside the package
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
          "-w", str(tmp_path / "wheels"), str(sdist)], tmp_path, env)
    (wheel,) = (tmp_path / "wheels").glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    assert {f"avstfp_fast/csrc/{f}" for f in cu_files} <= names
    assert "avstfp_fast/kernels/prompted_attention.py" in names

    # a fresh venv that sees this interpreter's packages (torch, pip) but not the source
    # tree: a plain path line in a .pth does not run the editable install's own .pth hooks
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    vpy = venv / "bin" / "python"
    vsite = Path(_run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                      tmp_path, env).strip())
    chained = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    (vsite / "_chain.pth").write_text("".join(p + "\n" for p in chained))
    _run([str(vpy), "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed",
          str(wheel)], tmp_path, env)

    out = json.loads(_run([str(vpy), "-c", CHECK], tmp_path,
                          dict(env, AVSTFP_BUILD_DIR=str(tmp_path / "jit"))).splitlines()[-1])
    assert out["package_inside"], out["package"]
    assert out["csrc"].startswith(str(vsite)), out["csrc"]
    assert out["sources"] and out["all_inside"], out
    assert sorted(os.path.basename(f) for f in out["sources"] + out["headers"]) == cu_files
    assert out["jit_sources"] == out["sources"] and out["jit_includes"] == [out["csrc"]]
    assert out["build_dir"].startswith(str(tmp_path / "jit"))

    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found: the installed sources were located but not preprocessed")
    for f in out["sources"]:
        if f.endswith(".cu"):   # binding.cpp needs torch's headers: its includes are torch's
            _run([nvcc, "-E", "-std=c++17", "-I", out["csrc"], f, "-o", os.devnull], tmp_path, env)
