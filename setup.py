"""Build of hpa-kernels' compiled modules (metadata lives in pyproject.toml).

* ``hpa_kernels._C``: the CPU kernels (csrc/cpu, C++17, OpenMP when the compiler has it).
* ``hpa_kernels._C_cuda``: the CUDA kernels (csrc/cuda), built when ``nvcc`` is found
  (``$CUDA_HOME/bin``, ``$PATH``, ``/usr/local/cuda/bin``). The ``.cu`` files are compiled by nvcc
  to objects, linked with the host-compiled pybind11 module and a static cudart, so the module has
  no torch C++ ABI dependency and imports where there is no GPU.

Environment:
    HPA_CUDA_ARCHS   compute capabilities, e.g. "80;90" (default) or "90"; the last also gets PTX.
    HPA_BUILD_CUDA   "0" skips the CUDA module, "1" makes a missing nvcc an error.
    CUDA_HOME        CUDA toolkit root (else found from nvcc).

Only pybind11 and setuptools are needed to build ([build-system] in pyproject.toml); CMakeLists.txt
builds the same two modules for CMake users.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ROOT = Path(__file__).resolve().parent
INCLUDE = ["csrc/include"]
CPU_SOURCES = ["python/bind_cpu.cpp", "csrc/cpu/adamw.cpp", "csrc/cpu/hpa.cpp"]
CUDA_SOURCES = ["csrc/cuda/adamw.cu", "csrc/cuda/hpa.cu"]
DEFAULT_CUDA_ARCHS = "80;90"  # A100, H100/H200


def _openmp_flags() -> list[str]:
    """``["-fopenmp"]`` when the C++ compiler accepts it (gcc, clang with libomp), else ``[]``."""
    if sys.platform == "win32":
        return ["/openmp"]
    cxx = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "omp.cpp"
        src.write_text("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            ok = subprocess.run(
                [cxx, "-fopenmp", str(src), "-o", str(Path(tmp) / "omp")], capture_output=True
            ).returncode
        except OSError:
            return []
    return ["-fopenmp"] if ok == 0 else []


def _find_nvcc() -> str | None:
    if os.environ.get("HPA_BUILD_CUDA") == "0":
        return None
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        candidates.append(Path(found))
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    for nvcc in candidates:
        if nvcc.is_file():
            return str(nvcc)
    if os.environ.get("HPA_BUILD_CUDA") == "1":
        raise RuntimeError("HPA_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME)")
    return None


def _cudart_static_dir(nvcc: str) -> str:
    """The folder holding libcudart_static.a (nvcc may be a wrapper script outside the toolkit)."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), str(Path(nvcc).resolve().parent.parent)]
    homes.append("/usr/local/cuda")
    for home in filter(None, homes):
        for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib", "lib/x64"):
            if (Path(home) / sub / "libcudart_static.a").is_file():
                return str(Path(home) / sub)
    raise RuntimeError(f"nvcc found at {nvcc} but no libcudart_static.a; set CUDA_HOME (or HPA_BUILD_CUDA=0)")


def cuda_archs() -> list[str]:
    """Compute capabilities from HPA_CUDA_ARCHS ("80;90", "8.0,9.0", "sm_90" all accepted)."""
    raw = os.environ.get("HPA_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
    archs = [a.replace(".", "").removeprefix("sm_") for a in re.split(r"[;,\s]+", raw) if a]
    if not archs or not all(a.isdigit() for a in archs):
        raise ValueError(f"HPA_CUDA_ARCHS={raw!r}: expected compute capabilities like '80;90'")
    return archs


def _gencode(archs: list[str]) -> list[str]:
    flags = []
    for arch in archs[:-1]:
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    last = archs[-1]
    flags.append(f"-gencode=arch=compute_{last},code=[sm_{last},compute_{last}]")  # PTX for newer GPUs
    return flags


class BuildExt(build_ext):
    """pybind11's build_ext, plus nvcc for the ``.cu`` sources of the CUDA module."""

    def build_extension(self, ext):
        cu_sources = getattr(ext, "cuda_sources", None)
        if cu_sources:
            ext.extra_objects = self._compile_cuda(ext, cu_sources)
        super().build_extension(ext)

    def _compile_cuda(self, ext, sources: list[str]) -> list[str]:
        nvcc = ext.nvcc
        out_dir = Path(self.build_temp) / "cuda"
        out_dir.mkdir(parents=True, exist_ok=True)
        flags = [
            "-std=c++17",
            "-O3",
            "-fmad=false",  # no a*b+c contraction: the same rounding as the CPU build (-ffp-contract=off)
            "-Xcompiler",
            "-fPIC",
            "--threads",
            "2",
            *[f"-I{ROOT / d}" for d in INCLUDE],
            *_gencode(cuda_archs()),
        ]

        def compile_one(src: str) -> str:
            obj = out_dir / (Path(src).stem + ".o")
            cmd = [nvcc, *flags, "-c", str(ROOT / src), "-o", str(obj)]
            print(" ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
            return str(obj)

        with ThreadPoolExecutor(max_workers=len(sources)) as pool:
            return list(pool.map(compile_one, sources))


def _cpu_math_flags() -> list[str]:
    """Flags that let the CPU loops vectorise without changing any result (no -ffast-math): sqrtf
    need not set errno, FP ops may be if-converted (no trap semantics), and no a*b+c contraction
    (the AVX2 and baseline paths of csrc/include/hpa/isa.h round alike)."""
    if sys.platform == "win32":
        return []
    return ["-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"]


def _extensions() -> list[Pybind11Extension]:
    omp = _openmp_flags()
    exts = [
        Pybind11Extension(
            "hpa_kernels._C",
            CPU_SOURCES,
            include_dirs=list(INCLUDE),
            extra_compile_args=["-O3", *_cpu_math_flags(), *omp],
            extra_link_args=omp,
            cxx_std=17,
        )
    ]
    nvcc = _find_nvcc()
    if nvcc is not None:
        cuda_ext = Pybind11Extension(
            "hpa_kernels._C_cuda",
            ["python/bind_cuda.cpp"],
            include_dirs=list(INCLUDE),
            library_dirs=[_cudart_static_dir(nvcc)],
            libraries=["cudart_static", "rt", "pthread", "dl"],
            extra_compile_args=["-O2"],
            cxx_std=17,
        )
        cuda_ext.cuda_sources = CUDA_SOURCES
        cuda_ext.nvcc = nvcc
        # Rebuild when a .cu or header changes.
        cuda_ext.depends = CUDA_SOURCES + [str(p.relative_to(ROOT)) for p in (ROOT / "csrc/include").rglob("*.h")]
        exts.append(cuda_ext)
    return exts


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildExt})
