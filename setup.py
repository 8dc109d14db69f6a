"""Build for klops: the distribution ``klops-kernels`` (the name ``klops`` on PyPI is another project), the
import name ``klops``.

Build switches (environment variables):
  KLOPS_BUILD_CUDA=1     build the CUDA extension ``klops._C`` from ``csrc/`` with ninja (needs nvcc and a
                         CUDA build of torch). Without it the package is pure Python (Triton + torch) and
                         works with or without a GPU.
  TORCH_CUDA_ARCH_LIST   the GPU architectures to compile for, e.g. "9.0" or "8.0;9.0". This is the only
                         arch switch: no -gencode flag is added here, because torch ignores
                         TORCH_CUDA_ARCH_LIST as soon as any compile flag names an arch.
  MAX_JOBS               parallel compile jobs; when unset, chosen from free memory and printed.
  NVCC_THREADS           nvcc --threads (default 2).

Architecture policy (the default TORCH_CUDA_ARCH_LIST): 8.0 (A100), 8.9 (L40, RTX 4090), 9.0 (H100, H200)
and 10.0 (B200) where the installed nvcc supports it (CUDA 12.8 or newer). No kernel uses Hopper-only
features (wgmma, TMA), so there is no 9.0a target; add one beside 9.0 when a kernel does.

Version: ``klops.__version__`` for the pure-Python build. With KLOPS_BUILD_CUDA=1 the local version names the
CUDA and torch the extension was built against, as flash-attn's wheels do: ``0.1.0+cu130torch2.14``. The
extension records the same (``klops info``), and klops does not load it under another torch or CUDA.
scripts/build_wheel.sh builds a wheel.
"""

import os
import re
import subprocess

from setuptools import setup

BUILD_CUDA = os.environ.get("KLOPS_BUILD_CUDA", "0") == "1"
VERSION = re.search(r'__version__ = "([^"]+)"', open(os.path.join("klops", "__init__.py")).read()).group(1)

# csrc/ goes into every wheel as klops.csrc: the headers and the CPU sources that klops/_cpu.py compiles on first
# use (the CUDA sources stay out: klops._C is built here or not at all).
packages = ["klops", "klops.integrations", "klops.trainers", "klops.kernels", "klops.csrc"]
package_dir = {"klops": "klops", "klops.kernels": "kernels", "klops.csrc": "csrc"}
package_data = {"klops.csrc": ["*.cuh", "*.h", "cpu/*.h", "cpu/*.cpp"]}
ext_modules = []
cmdclass = {}


def nvcc_version(cuda_home: str) -> tuple[int, int]:
    """(major, minor) of the nvcc under cuda_home."""
    out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True)
    major, minor = re.search(r"release (\d+)\.(\d+)", out.stdout).groups()
    return int(major), int(minor)


if BUILD_CUDA:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension

    if CUDA_HOME is None:
        raise RuntimeError("KLOPS_BUILD_CUDA=1 needs the CUDA toolkit: set CUDA_HOME to its prefix")
    nvcc = nvcc_version(CUDA_HOME)
    default_archs = "8.0;8.9;9.0" + (";10.0" if nvcc >= (12, 8) else "")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", default_archs)
    if "MAX_JOBS" not in os.environ:
        free_gib = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
        os.environ["MAX_JOBS"] = str(max(1, min(os.cpu_count() or 1, int(free_gib // 4))))
        print(f"klops setup.py: MAX_JOBS={os.environ['MAX_JOBS']} (from free memory)")
    arch_list = os.environ["TORCH_CUDA_ARCH_LIST"]
    torch_version = torch.__version__.split("+")[0]
    torch_major_minor = ".".join(torch_version.split(".")[:2])
    VERSION += f"+cu{nvcc[0]}{nvcc[1]}torch{torch_major_minor}"
    print(f"klops setup.py: building klops._C {VERSION} for TORCH_CUDA_ARCH_LIST={arch_list} with nvcc {nvcc}")
    sources = sorted(os.path.join("csrc", name) for name in os.listdir("csrc") if name.endswith((".cpp", ".cu")))
    ext_modules.append(
        CUDAExtension(
            name="klops._C",
            sources=sources,
            define_macros=[
                ("KLOPS_CUDA_ARCH_LIST", f'"{arch_list}"'),
                ("KLOPS_TORCH_VERSION", f'"{torch_version}"'),
            ],
            # No -std flag: torch's build adds the standard its headers need (C++20 from torch 2.10 on).
            extra_compile_args={
                "cxx": ["-O3"],
                "nvcc": [
                    "-O3",
                    f"--threads={os.environ.get('NVCC_THREADS', '2')}",
                ],
            },
        )
    )
    cmdclass["build_ext"] = BuildExtension

setup(
    version=VERSION,
    packages=packages,
    package_dir=package_dir,
    package_data=package_data,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
