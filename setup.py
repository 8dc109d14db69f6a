"""Build for klops.

Build switches (environment variables):
  KLOPS_BUILD_CUDA=1     build the CUDA extension ``klops._C`` from ``csrc/`` (needs nvcc and a CUDA
                         build of torch). Without it the package is pure Python (Triton + torch).
  TORCH_CUDA_ARCH_LIST   the GPU architectures to compile for, e.g. "9.0" or "8.0;9.0". This is the
                         only arch policy: no -gencode flag is added here, because torch ignores
                         TORCH_CUDA_ARCH_LIST as soon as any compile flag names an arch. Default "9.0".
  MAX_JOBS               parallel compile jobs; when unset, chosen from free memory and printed.
  NVCC_THREADS           nvcc --threads (default 2).
"""

import os

from setuptools import setup

BUILD_CUDA = os.environ.get("KLOPS_BUILD_CUDA", "0") == "1"

packages = ["klops", "klops.kernels"]
package_dir = {"klops": "klops", "klops.kernels": "kernels"}
ext_modules = []
cmdclass = {}

if BUILD_CUDA:
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    if "MAX_JOBS" not in os.environ:
        free_gib = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
        os.environ["MAX_JOBS"] = str(max(1, min(os.cpu_count() or 1, int(free_gib // 4))))
        print(f"klops setup.py: MAX_JOBS={os.environ['MAX_JOBS']} (from free memory)")
    arch_list = os.environ["TORCH_CUDA_ARCH_LIST"]
    print(f"klops setup.py: building klops._C for TORCH_CUDA_ARCH_LIST={arch_list}")
    sources = sorted(os.path.join("csrc", name) for name in os.listdir("csrc") if name.endswith((".cpp", ".cu")))
    ext_modules.append(
        CUDAExtension(
            name="klops._C",
            sources=sources,
            define_macros=[("KLOPS_CUDA_ARCH_LIST", f'"{arch_list}"')],
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

setup(packages=packages, package_dir=package_dir, ext_modules=ext_modules, cmdclass=cmdclass)
