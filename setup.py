"""Build script.  Metadata lives in pyproject.toml.

``kernels/`` (pure Triton) is mapped into the package as ``avstfp_fast.kernels`` — we never
install a top-level module called ``kernels`` (a PyPI package of that name exists).
``csrc/`` (the CUDA sources) ships inside the package as ``avstfp_fast/csrc`` (data files,
not a module), so that an installed wheel can JIT-build the extension
(``avstfp_fast._build.CSRC`` looks there first).

The CUDA extension ``avstfp_fast._C`` is optional at install time: it is built when torch
is importable in the build environment and nvcc is found, unless AVSTFP_NO_CUDA=1.
Otherwise the install succeeds without it and the extension is JIT-compiled on first
use of ``backend="cuda"``.
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

packages = find_packages(include=["avstfp_fast", "avstfp_fast.*"]) + ["avstfp_fast.kernels",
                                                                       "avstfp_fast.csrc"]
package_dir = {"avstfp_fast.kernels": "kernels", "avstfp_fast.csrc": "csrc"}
package_data = {"avstfp_fast.csrc": ["*.cu", "*.cuh", "*.h", "*.cpp"],
                "avstfp_fast.ops": ["autotable.json"]}     # the measured GPU order, if any
ext_modules, cmdclass = [], {}


def _want_cuda() -> bool:
    if os.environ.get("AVSTFP_NO_CUDA", "0") == "1":
        return False
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        return False
    try:
        import torch  # noqa: F401
        from torch.utils import cpp_extension  # noqa: F401
    except Exception:
        return False
    return bool(glob.glob("csrc/*.cu"))


if _want_cuda():
    # Build settings live in the package (shared with the JIT path); load by file path so
    # that the package itself is not imported at build time.
    import importlib.util
    _spec = importlib.util.spec_from_file_location("_avstfp_build", "avstfp_fast/_build.py")
    _build = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_build)
    ext_modules, cmdclass = _build.cuda_extension()

setup(packages=packages, package_dir=package_dir, package_data=package_data,
      ext_modules=ext_modules, cmdclass=cmdclass)
