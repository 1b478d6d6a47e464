"""Build sparseode and its compiled extension ``sparseode._C``.

Environment switches:
  SPARSEODE_CUDA=0   never build the CUDA kernels (csrc/cuda), even where torch has CUDA.
  SPARSEODE_CUDA=1   always build them; it is a build error if torch has no CUDA or nvcc is missing.
  (unset)            build them when torch.version.cuda is set and CUDA_HOME points at nvcc.
  SPARSEODE_NATIVE=0 compile the CPU kernels without -march=native (portable wheel).
  DEBUG=1            -O0 -g, no fast-math, for stepping through the kernels.

torch must already be installed (README: ``pip install torch==2.13.0``) and the build run with
``pip install --no-build-isolation .`` so that no other torch wheel is pulled in.
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - the message is the point
    sys.exit(
        "sparseode's build needs torch installed first: run `pip install torch==2.13.0` "
        "and then `pip install --no-build-isolation .`"
    )

ROOT = os.path.dirname(os.path.abspath(__file__))
DEBUG = os.environ.get("DEBUG", "0") == "1"


def _want_cuda() -> bool:
    flag = os.environ.get("SPARSEODE_CUDA")
    can = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if flag == "1" and not can:
        raise RuntimeError(
            "SPARSEODE_CUDA=1 but the CUDA kernels cannot be built: "
            f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={cpp_extension.CUDA_HOME!r} "
            "(install a CUDA build of torch and nvcc, or unset SPARSEODE_CUDA)"
        )
    if flag == "0":
        return False
    return can


def _compiler_accepts(flag: str) -> bool:
    """True when the C++ compiler builds an empty file with ``flag`` (used for -march)."""
    cxx = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as fh:
            fh.write("int main() { return 0; }\n")
        cmd = [cxx, flag, src, "-o", os.path.join(tmp, "probe")]
        return subprocess.run(cmd, capture_output=True).returncode == 0


def _cpu_flags() -> list[str]:
    if DEBUG:
        return ["-O0", "-g", "-fopenmp", "-std=c++17"]
    flags = ["-O3", "-fopenmp", "-std=c++17", "-fno-math-errno"]
    # -march=native only when the compiler takes it; otherwise the portable baseline ISA,
    # where the kernels' scalar loops still auto-vectorise with SSE2.
    if os.environ.get("SPARSEODE_NATIVE", "1") == "1" and _compiler_accepts("-march=native"):
        flags.append("-march=native")
    return flags


def extensions():
    sources = [os.path.join("csrc", "ops.cpp")] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    include_dirs = [os.path.join(ROOT, "csrc")]
    extra = {"cxx": _cpu_flags()}
    ext_cls = cpp_extension.CppExtension
    define_macros = []
    if _want_cuda():
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        extra["nvcc"] = ["-O3" if not DEBUG else "-G", "-std=c++17", "--expt-relaxed-constexpr"]
        ext_cls = cpp_extension.CUDAExtension
        define_macros.append(("SPARSEODE_WITH_CUDA", None))
    return [
        ext_cls(
            name="sparseode._C",
            sources=sources,
            include_dirs=include_dirs,
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
            define_macros=define_macros,
            py_limited_api=False,
        )
    ]


packages = find_packages(include=["sparseode", "sparseode.*"]) + ["sparseode.kernels"]

setup(
    packages=packages,
    package_dir={"sparseode.kernels": "kernels"},
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
