"""Check an installed klops-kernels CUDA wheel from outside the source tree (CI runs it after
scripts/build_wheel.sh, in a fresh environment):

    python scripts/check_wheel.py WHEEL 8.0 9.0

- the wheel's local version names the CUDA and torch it was built against, e.g. 0.1.0+cu130torch2.14;
- ``import klops`` and ``klops._C`` come from site-packages, and klops uses the extension;
- every op of klops._C has its CUDA kernel registered;
- ``cuobjdump --list-elf`` (from the triton wheel) finds a cubin for each architecture asked, and no other;
- ``backend="cuda"`` on CPU tensors raises the clear ValueError, and the torch backend runs.
"""

import os
import pathlib
import re
import subprocess
import sys

import torch


def main(wheel: str, archs: list[str]) -> None:
    import triton

    import klops
    import klops._C
    from klops import backend, cli

    name = pathlib.Path(wheel).name
    cuda = torch.version.cuda.replace(".", "")
    torch_major_minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    local = f"+cu{cuda}torch{torch_major_minor}"
    assert f"-{klops.__version__}{local}-" in name, f"wheel {name} does not name cu{cuda} / torch {torch_major_minor}"
    assert cli.distribution_version() == klops.__version__ + local, cli.distribution_version()
    for module in (klops, klops._C):
        assert "site-packages" in module.__file__, f"{module.__name__} imported from {module.__file__}"
    assert backend.CUDA_EXTENSION is not None, backend.CUDA_EXTENSION_PROBLEM
    assert klops._C.arch_list() == ";".join(archs), klops._C.arch_list()
    info = cli.info()
    assert "sm_" + archs[0].replace(".", "") in info, info

    for op in ("divergence_forward", "divergence_backward", "topk_divergence_forward", "topk_divergence_backward",
               "logprobs_forward", "logprobs_backward"):  # fmt: skip
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"klops_C::{op}", "CUDA"), f"no CUDA kernel for {op}"

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    listing = subprocess.run([cuobjdump, "--list-elf", klops._C.__file__], capture_output=True, text=True, check=True)
    found = sorted(set(re.findall(r"\.sm_(\d+)\.cubin", listing.stdout)))
    expected = sorted(arch.replace(".", "") for arch in archs)
    assert found == expected, f"cubins for sm_{found}, expected sm_{expected}:\n{listing.stdout}"

    z, y = torch.randn(3, 50), torch.randn(3, 50)
    try:
        klops.fused_kl(z, y, backend="cuda")
    except ValueError as error:
        assert "backend='cuda' cannot run on cpu tensors here" in str(error), error
    else:
        raise AssertionError("backend='cuda' on CPU tensors did not raise")
    assert torch.isfinite(klops.fused_kl(z, y, backend="torch"))
    print(f"ok: {name}: klops._C for sm_{', sm_'.join(found)}, {cli.distribution_version()}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
