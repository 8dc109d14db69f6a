"""Every Triton kernel variant compiles for real GPUs (sm_80, sm_90), down to a cubin via ptxas.

The interpreter that runs the numeric tests on the CPU accepts code the GPU compiler rejects (e.g. a
non-constexpr global), so this ahead-of-time compile is the CPU-only check that the kernels build.
"""

import pytest

triton = pytest.importorskip("triton")
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:  # pragma: no cover - older Triton without the AOT API
    pytest.skip("this Triton has no ahead-of-time compile API", allow_module_level=True)

from klops.kernels import divergence, logprobs
from klops.kernels.launch import DIVERGENCE_KINDS, TARGET_KINDS

ROW_ARGS = {"L": "i32", "V": "i32"}
FLOAT_ARGS = ("inv_temperature", "coef", "log_coef", "log_1m_coef")


def compile_for(kernel, signature, constexprs, arch):
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 8})
    assert "cubin" in compiled.asm and len(compiled.asm["cubin"]) > 0


def divergence_signature(student, teacher, backward):
    sig = {}
    if backward:
        sig["grad_ptr"] = "*fp32"
    sig |= {"z_ptr": f"*{student}", "y_ptr": f"*{teacher}", "valid_ptr": "*i1"}
    if backward:
        sig |= {"lse_q_ptr": "*fp32", "lse_t_ptr": "*fp32", "gbar_ptr": "*fp32", "dz_ptr": f"*{student}"}
    else:
        sig |= {"loss_ptr": "*fp32", "lse_q_ptr": "*fp32", "lse_t_ptr": "*fp32", "gbar_ptr": "*fp32"}
    sig |= ROW_ARGS | {"stride_zb": "i64", "stride_zl": "i64", "stride_yb": "i64", "stride_yl": "i64"}
    return sig | {name: "fp32" for name in FLOAT_ARGS}


DIVERGENCE_VARIANTS = [(kind, "logits", "bf16", "bf16") for kind in DIVERGENCE_KINDS] + [
    ("forward", "logprobs", "bf16", "fp32"),
    ("reverse", "probs", "fp16", "fp32"),
    ("jsd", "logits", "fp32", "fp32"),
]


@pytest.mark.parametrize("backward", [False, True], ids=["forward_kernel", "backward_kernel"])
@pytest.mark.parametrize("kind, target, student, teacher", DIVERGENCE_VARIANTS)
def test_divergence_kernels_compile(kind, target, student, teacher, backward, monkeypatch):
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    kernel = divergence.divergence_backward_kernel if backward else divergence.divergence_forward_kernel
    constexprs = {"KIND": DIVERGENCE_KINDS.index(kind), "TARGET": TARGET_KINDS.index(target), "BLOCK_V": 4096}
    compile_for(kernel, divergence_signature(student, teacher, backward), constexprs, 90)


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("with_entropy", [True, False])
def test_logprobs_kernels_compile(with_entropy, arch, monkeypatch):
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    common = ROW_ARGS | {"stride_zb": "i64", "stride_zl": "i64", "inv_temperature": "fp32", "ignore_index": "i64"}
    constexprs = {"WITH_ENTROPY": with_entropy, "BLOCK_V": 4096}
    forward = {"z_ptr": "*bf16", "labels_ptr": "*i64", "logp_ptr": "*fp32", "entropy_ptr": "*fp32", "lse_ptr": "*fp32"}
    compile_for(logprobs.logprobs_forward_kernel, forward | common, constexprs, arch)
    backward = {"grad_logp_ptr": "*fp32", "grad_entropy_ptr": "*fp32", "z_ptr": "*bf16", "labels_ptr": "*i64",
                "lse_ptr": "*fp32", "entropy_ptr": "*fp32", "dz_ptr": "*bf16"}  # fmt: skip
    compile_for(logprobs.logprobs_backward_kernel, backward | common, constexprs, arch)
