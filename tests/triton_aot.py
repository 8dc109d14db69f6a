"""Ahead-of-time compile of every Triton kernel variant for real GPUs, with no GPU present.

Run as ``python -m tests.triton_aot`` in a process without TRITON_INTERPRET (under the interpreter
``@triton.jit`` yields interpreted functions that cannot be compiled); prints one JSON object mapping
each variant id to "ok" or the compiler's error. tests/test_triton_compile.py drives it.
"""

import json
import os

from klops.kernels.launch import DIVERGENCE_KINDS, TARGET_KINDS

FLOAT_ARGS = ("inv_temperature", "coef", "log_coef", "log_1m_coef")
ROW_ARGS = {"L": "i32", "V": "i32"}
STATS = ("max_q_ptr", "logsum_q_ptr", "max_t_ptr", "logsum_t_ptr", "gbar_ptr")

DIVERGENCE_VARIANTS = [(kind, "logits", "bf16", "bf16") for kind in DIVERGENCE_KINDS] + [
    ("forward", "logprobs", "bf16", "fp32"),
    ("reverse", "probs", "fp16", "fp32"),
    ("jsd", "logits", "fp32", "fp32"),
]
VARIANTS = [f"divergence-{'-'.join(v)}-{d}" for v in DIVERGENCE_VARIANTS for d in ("fwd", "bwd")] + [
    f"logprobs-entropy{int(e)}-sm{arch}" for e in (True, False) for arch in (80, 90)
]


def divergence_signature(student, teacher, backward):
    sig = {"grad_ptr": "*fp32"} if backward else {}
    sig |= {"z_ptr": f"*{student}", "y_ptr": f"*{teacher}", "valid_ptr": "*i1"}
    if backward:
        sig |= {name: "*fp32" for name in STATS} | {"dz_ptr": f"*{student}"}
    else:
        sig |= {"loss_ptr": "*fp32"} | {name: "*fp32" for name in STATS}
    sig |= ROW_ARGS | {"stride_zb": "i64", "stride_zl": "i64", "stride_yb": "i64", "stride_yl": "i64"}
    return sig | {name: "fp32" for name in FLOAT_ARGS}


def compile_all() -> dict[str, str]:
    import triton
    from klops.kernels import divergence, logprobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def compile_for(kernel, signature, constexprs, arch):
        signature = {**signature, **{name: "constexpr" for name in constexprs}}
        src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 8})
        assert len(compiled.asm["cubin"]) > 0, "empty cubin"

    jobs = {}  # variant id -> [(kernel, signature, constexprs, arch), ...]
    for kind, target, student, teacher in DIVERGENCE_VARIANTS:
        constexprs = {"KIND": DIVERGENCE_KINDS.index(kind), "TARGET": TARGET_KINDS.index(target), "BLOCK_V": 4096}
        for direction, kernel in (
            ("fwd", divergence.divergence_forward_kernel),
            ("bwd", divergence.divergence_backward_kernel),
        ):
            sig = divergence_signature(student, teacher, direction == "bwd")
            jobs[f"divergence-{kind}-{target}-{student}-{teacher}-{direction}"] = [(kernel, sig, constexprs, 90)]
    common = ROW_ARGS | {"stride_zb": "i64", "stride_zl": "i64", "inv_temperature": "fp32", "ignore_index": "i64"}
    forward = {"z_ptr": "*bf16", "labels_ptr": "*i64", "logp_ptr": "*fp32", "entropy_ptr": "*fp32",
               "max_ptr": "*fp32", "logsum_ptr": "*fp32"}  # fmt: skip
    backward = {"grad_logp_ptr": "*fp32", "grad_entropy_ptr": "*fp32", "z_ptr": "*bf16", "labels_ptr": "*i64",
                "max_ptr": "*fp32", "logsum_ptr": "*fp32", "entropy_ptr": "*fp32", "dz_ptr": "*bf16"}  # fmt: skip
    for with_entropy in (True, False):
        for arch in (80, 90):
            constexprs = {"WITH_ENTROPY": with_entropy, "BLOCK_V": 4096}
            jobs[f"logprobs-entropy{int(with_entropy)}-sm{arch}"] = [
                (logprobs.logprobs_forward_kernel, forward | common, constexprs, arch),
                (logprobs.logprobs_backward_kernel, backward | common, constexprs, arch),
            ]
    results = {}
    for name, kernels in jobs.items():
        try:
            for kernel, sig, constexprs, arch in kernels:
                compile_for(kernel, sig, constexprs, arch)
            results[name] = "ok"
        except Exception as error:  # reported per variant by the test
            results[name] = f"{type(error).__name__}: {error}"
    return results


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET=1"
    print(json.dumps(compile_all()))
