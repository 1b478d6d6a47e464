"""Build sparseode and its compiled extension ``sparseode._C``.

Environment switches:
  SPARSEODE_CUDA=0   never build the CUDA kernels (csrc/cuda), even where torch has CUDA.
  SPARSEODE_CUDA=1   always build them; it is a build error if torch has no CUDA or nvcc is missing.
  (unset)            build them when torch.version.cuda is set and CUDA_HOME points at nvcc.
  SPARSEODE_NATIVE=0 (the default) portable CPU kernels: one extension holds a baseline x86-64
                     (SSE2), an AVX2+FMA and an AVX-512 (F/BW/VL/DQ) variant of them, picked at run
                     time from the CPU (csrc/cpu/dispatch.h; at run time
                     SPARSEODE_CPU_CAPABILITY=default|avx2|avx512 asks for a narrower one).
  SPARSEODE_NATIVE=1 one -march=native variant, for the build machine only (another CPU may die
                     on an illegal instruction).
  DEBUG=1            -O0 -g, no fast-math, for stepping through the kernels.

torch must already be installed (README: ``pip install torch==2.13.0``) and the build run with
``pip install --no-build-isolation .`` so that no other torch wheel is pulled in.
"""
from __future__ import annotations

import glob
import os
import platform
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


def _native() -> bool:
    """SPARSEODE_NATIVE=1, checked: the compiler must take -march=native."""
    if os.environ.get("SPARSEODE_NATIVE", "0") != "1":
        return False
    if not _compiler_accepts("-march=native"):
        raise RuntimeError("SPARSEODE_NATIVE=1 but the C++ compiler rejects -march=native (unset SPARSEODE_NATIVE)")
    return True


def _cpu_flags(native: bool) -> list[str]:
    flags = ["-O0", "-g"] if DEBUG else ["-O3", "-fno-math-errno"]
    return flags + ["-fopenmp", "-std=c++17"] + (["-march=native"] if native else [])


def _cpu_variant_sources(native: bool) -> list[str]:
    """The kernel variants (csrc/cpu/variants): native alone, or baseline (+ AVX2, AVX-512 on x86)."""
    if native:
        names = ["native"]
    elif platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        names = ["default", "avx2", "avx512"]
    else:
        names = ["default"]
    return [os.path.join("csrc", "cpu", "variants", f"{name}.cpp") for name in names]


def extensions():
    native = _native()
    # csrc/*.cpp: the schemas (ops.cpp) and the per-op autograd (autograd_ops.cpp)
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp"))) + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    sources += _cpu_variant_sources(native)
    include_dirs = [os.path.join(ROOT, "csrc")]
    extra = {"cxx": _cpu_flags(native)}
    ext_cls = cpp_extension.CppExtension
    define_macros = [("SPARSEODE_CPU_NATIVE", None)] if native else []
    if _want_cuda():
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        extra["nvcc"] = ["-O3" if not DEBUG else "-G", "-std=c++17", "--expt-relaxed-constexpr"]
        ext_cls = cpp_extension.CUDAExtension
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
