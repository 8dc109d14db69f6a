"""Ahead-of-time compile of every Triton kernel variant for real GPUs, with no GPU present.

Run as ``python -m tests.triton_aot`` in a process without TRITON_INTERPRET (under the interpreter
``@triton.jit`` yields interpreted functions that cannot be compiled); prints one JSON object mapping
each variant id to its status ("ok" or the compiler's error) and, per compiled kernel, the launch
config of kernels/launch.py, the registers and local (spill) bytes per thread from the cubin, and the
exponentials per entry of each loop from the PTX. tests/test_triton_compile.py drives it;
``python -m tests.triton_aot --table`` prints the same as a table.
"""

import json
import os
import re
import subprocess
import sys
import tempfile

from klops.kernels.kinds import DIVERGENCE_KINDS
from klops.kernels.launch import BACKWARD_SWEEP, FORWARD_SWEEP, TARGET_KINDS

FLOAT_ARGS = ("inv_temperature", "coef")
ROW_ARGS = {"L": "i32", "V": "i32"}
STATS = ("max_q_ptr", "logsum_q_ptr", "max_t_ptr", "logsum_t_ptr", "gbar_ptr")

# (kind, target, student dtype, teacher dtype, labels): with "labels" the backward also writes the gradient of
# the label's log-prob (the forward does not depend on it).
DIVERGENCE_VARIANTS = [(kind, "logits", "bf16", "bf16", "") for kind in DIVERGENCE_KINDS] + [
    ("forward", "logprobs", "bf16", "fp32", ""),
    ("reverse", "probs", "fp16", "fp32", ""),
    ("jsd", "logits", "fp32", "fp32", ""),
    ("forward", "logits", "bf16", "bf16", "labels"),
    ("jsd", "logits", "bf16", "fp32", "labels"),
]
# (kind, tail, student dtype, teacher log-probs dtype, BLOCK_K): every kind with the bin, the renormalized tail,
# and k past one block of members. The backward does not depend on the kind or tail.
TOPK_VARIANTS = [(kind, "bin", "bf16", "fp32", 64) for kind in DIVERGENCE_KINDS] + [
    ("forward", "renormalize", "bf16", "bf16", 64),
    ("jsd", "renormalize", "fp16", "fp32", 256),
    ("forward", "bin", "fp32", "fp32", 1),
]
# Sinkhorn's tile kernels: the soft-min from a cost matrix (fp32, bf16), from points and the points' gradient
# (both costs), SinKD's L1 cost between softmax rows and its backward (bf16 logits).
SINKHORN_VARIANTS = ["softmin-cost-fp32", "softmin-cost-bf16", "softmin-cost-fp32-transposed", "points-sqeuclidean",
                     "points-l1", "softmax-l1-bf16"]  # fmt: skip
# The fused-linear tile kernels (kernels/linear.py), forward and backward, on sm_80 and sm_90:
# (hidden / weight dtype, dot precision, HAS_BIAS, SOFTCAP, WITH_ENTROPY, WITH_STATS): log-probs + entropy,
# TRL's fused LM head (entropy and the row stats, soft cap), the cross-entropy with bias, soft cap and label
# smoothing (the stats' mean logit), fp16, and fp32 as torch runs it (ieee by default, tf32 under allow_tf32).
LINEAR_VARIANTS = [("bf16", "ieee", False, False, True, False), ("bf16", "ieee", False, True, True, True),
                   ("bf16", "ieee", True, True, False, True), ("fp16", "ieee", False, False, False, False),
                   ("fp32", "ieee", True, False, True, False), ("fp32", "tf32", False, True, False, False)]  # fmt: skip


# The fused-linear divergence kernels (kernels/linear_divergence.py) on sm_90: (kind, target, teacher as "hidden"
# states + head or "logits" (B, L, V), student dtype, teacher dtype, flags): every kind from hidden states (forward /
# reverse KL with the online KL sweep, the others with sweep 2), labels, bias + soft cap, the teacher's own soft cap
# ("tcap"), mixed dtypes, and the teacher encodings read in place.
LINEAR_DIVERGENCE_VARIANTS = [(kind, "logits", "hidden", "bf16", "bf16", "") for kind in DIVERGENCE_KINDS] + [
    ("reverse", "logits", "hidden", "bf16", "fp32", "bias-softcap"),
    ("forward", "logits", "hidden", "bf16", "bf16", "tcap"),
    ("jsd", "logits", "hidden", "fp32", "bf16", "softcap-tcap"),
    ("jsd", "logits", "hidden", "bf16", "bf16", "labels"),
    ("forward", "logits", "logits", "bf16", "bf16", "labels"),
    ("forward", "logprobs", "logits", "bf16", "fp32", ""),
    ("tv", "probs", "logits", "fp16", "fp32", "bias"),
]


# The logits-level log-prob kernels (kernels/logprobs.py): (WITH_ENTROPY, WITH_STATS).
LOGPROBS_VARIANTS = [(True, False), (False, False), (True, True), (False, True)]


def logprobs_flags(entropy: bool, stats: bool) -> str:
    return f"entropy{int(entropy)}" + ("-stats" if stats else "")


def linear_variant_name(variant) -> str:
    dtype, precision, bias, softcap, entropy, stats = variant
    flags = [name for name, on in (("bias", bias), ("softcap", softcap), ("entropy", entropy), ("stats", stats)) if on]
    return "-".join([dtype, precision] + flags)


VARIANTS = (
    [
        f"divergence-{'-'.join(filter(None, v))}-{d}"
        for v in DIVERGENCE_VARIANTS
        for d in ("fwd", "bwd")
        if not (v[4] and d == "fwd")
    ]
    + [f"logprobs-{logprobs_flags(e, s)}-sm{arch}" for e, s in LOGPROBS_VARIANTS for arch in (80, 90)]
    + [f"topk-{kind}-{tail}-{student}-{teacher}-k{block}" for kind, tail, student, teacher, block in TOPK_VARIANTS]
    + [f"topk-backward-{dtype}-sm{arch}" for dtype in ("bf16", "fp32") for arch in (80, 90)]
    + ["topk-backward-labels-bf16-sm90"]
    + [f"sinkhorn-{v}-sm{arch}" for v in SINKHORN_VARIANTS for arch in (80, 90)]
    + [f"akl-{op}-{dtype}-sm{arch}" for op in ("loss", "kl-pair") for dtype in ("bf16", "fp32") for arch in (80, 90)]
    + [f"linear-{linear_variant_name(v)}-sm{arch}" for v in LINEAR_VARIANTS for arch in (80, 90)]
    + [f"linear-divergence-{'-'.join(filter(None, v))}" for v in LINEAR_DIVERGENCE_VARIANTS]
)


def linear_jobs(linear, variant) -> list:
    """[(kernel, signature, constexprs, (None, num_warps, num_stages))] of kernels/linear.py's forward and
    backward for one LINEAR_VARIANTS entry, at its GPU tiles, with unit strides along D (as Triton
    specializes them at run time)."""
    dtype, precision, bias, softcap, entropy, stats = variant
    inputs = {"h_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "labels_ptr": "*i64"}
    shapes = {"N": "i32", "L": "i32", "V": "i32", "D": "i32"}
    strides = {"stride_hb": "i64", "stride_hl": "i64", "stride_hd": "constexpr", "stride_wv": "i64",
               "stride_wd": "constexpr"}  # fmt: skip
    matmul = {"HAS_BIAS": bias, "SOFTCAP": softcap, "DOT_FP32": False, "PRECISION": precision,
              "stride_hd": 1, "stride_wd": 1}  # fmt: skip
    partials = ("m_ptr", "s_ptr", "w_sum_ptr", "z_label_ptr", "s2_ptr", "z_sum_ptr", "before_ptr")
    forward = inputs | {name: "*fp32" for name in partials}
    forward |= shapes | {"split_size": "i32"} | strides | {"inv_temperature": "fp32", "softcap": "fp32",
                                                           "ignore_index": "i64"}  # fmt: skip
    backward = inputs | {name: "*fp32" for name in ("max_ptr", "logsum_ptr", "coef_ptr", "grad_h_ptr", "grad_w_ptr",
                                                     "grad_b_ptr")}  # fmt: skip
    backward |= shapes | strides | {"v_start": "i32", "inv_temperature": "fp32", "softcap": "fp32"}
    jobs = []
    for kernel, signature, tile, extra in (
        (linear.linear_logprobs_forward_kernel, forward, linear.FORWARD_TILE,
         {"WITH_ENTROPY": entropy, "WITH_STATS": stats}),
        (linear.linear_rows_backward_kernel, backward, linear.BACKWARD_TILE, {"GROUP_M": linear.GROUP_M}),
    ):  # fmt: skip
        block_m, block_v, block_k, num_warps, num_stages = tile
        blocks = {"BLOCK_M": block_m, "BLOCK_V": block_v, "BLOCK_K": block_k}
        jobs.append((kernel, signature, matmul | extra | blocks, (None, num_warps, num_stages)))
    return jobs


def linear_divergence_jobs(kernels, variant) -> list:
    """[(kernel, signature, constexprs, (None, num_warps, num_stages))] of kernels/linear_divergence.py's sweep 1,
    sweep 2 (every kind but forward / reverse KL between logits) and backward for one LINEAR_DIVERGENCE_VARIANTS
    entry, with unit strides along D and V as Triton specializes them."""
    from klops.kernels import linear

    kind, target, teacher, student_dtype, teacher_dtype, flags = variant
    pointers = {"h_ptr": f"*{student_dtype}", "w_ptr": f"*{student_dtype}", "b_ptr": f"*{student_dtype}",
                "t_ptr": f"*{teacher_dtype}", "tw_ptr": f"*{teacher_dtype}", "tb_ptr": f"*{teacher_dtype}"}  # fmt: skip
    shapes = {"N": "i32", "L": "i32", "V": "i32", "D": "i32", "Dt": "i32"}
    unit = ("stride_hd", "stride_wd", "stride_td", "stride_twd") + (("stride_twv",) if teacher == "logits" else ())
    names = ("stride_hb", "stride_hl", "stride_hd", "stride_wv", "stride_wd", "stride_tb", "stride_tl", "stride_td",
             "stride_twv", "stride_twd")  # fmt: skip
    strides = {name: "constexpr" if name in unit else "i64" for name in names}
    constants = {"inv_temperature": "fp32", "softcap": "fp32", "t_softcap": "fp32"}
    constexprs = {"KIND": DIVERGENCE_KINDS.index(kind), "TARGET": TARGET_KINDS.index(target),
                  "TEACHER_HIDDEN": teacher == "hidden", "T_HAS_BIAS": "bias" in flags, "HAS_BIAS": "bias" in flags,
                  "SOFTCAP": "softcap" in flags, "T_SOFTCAP": "tcap" in flags, "DOT_FP32": False,
                  "PRECISION": "ieee",
                  **{name: 1 for name in unit}}  # fmt: skip
    labels = {"WITH_LABELS": "labels" in flags}
    stats = pointers | {"valid_ptr": "*i1", "labels_ptr": "*i64", "part_ptr": "*fp32"} | shapes | {"split_size": "i32"}
    terms = pointers | {"valid_ptr": "*i1", "stats_ptr": "*fp32", "part_ptr": "*fp32"} | shapes | {"split_size": "i32"}
    backward = pointers | {"labels_ptr": "*i64", "stats_ptr": "*fp32", "coef_ptr": "*fp32", "grad_h_ptr": "*fp32",
                           "grad_w_ptr": "*fp32", "grad_b_ptr": "*fp32"} | shapes  # fmt: skip
    coef = constants | {"coef": "fp32"}
    stats_constexprs = constexprs | labels
    jobs = [
        (kernels.linear_divergence_stats_kernel, stats | strides | constants, stats_constexprs, linear.FORWARD_TILE)
    ]
    if not (target == "logits" and kind in ("forward", "reverse")):
        jobs.append((kernels.linear_divergence_terms_kernel, terms | strides | coef, constexprs, linear.FORWARD_TILE))
    backward_constexprs = constexprs | labels | {"GROUP_M": linear.GROUP_M}
    jobs.append((kernels.linear_divergence_backward_kernel, backward | strides | {"v_start": "i32"} | coef,
                 backward_constexprs, linear.BACKWARD_TILE))  # fmt: skip
    return [(kernel, sig, cx | {"BLOCK_M": tile[0], "BLOCK_V": tile[1], "BLOCK_K": tile[2]}, (None, *tile[3:]))
            for kernel, sig, cx, tile in jobs]  # fmt: skip


def divergence_signature(student, teacher, backward):
    sig = {"grad_ptr": "*fp32", "grad_logp_ptr": "*fp32"} if backward else {}
    sig |= {"z_ptr": f"*{student}", "y_ptr": f"*{teacher}", "valid_ptr": "*i1"}
    if backward:
        sig |= {"labels_ptr": "*i64"} | {name: "*fp32" for name in STATS} | {"dz_ptr": f"*{student}"}
    else:
        sig |= {"loss_ptr": "*fp32"} | {name: "*fp32" for name in STATS}
    sig |= ROW_ARGS | {"stride_zb": "i64", "stride_zl": "i64", "stride_yb": "i64", "stride_yl": "i64"}
    return sig | {name: "fp32" for name in FLOAT_ARGS}


def topk_signatures(student: str, teacher: str) -> tuple[dict, dict]:
    """(forward, backward) signatures of kernels/topk.py's kernels."""
    shapes = {"L": "i32", "V": "i32", "K": "i32", "stride_zb": "i64", "stride_zl": "i64", "inv_temperature": "fp32"}
    stats = {"max_c_ptr": "*fp32", "logsum_c_ptr": "*fp32", "tail_scale_ptr": "*fp32", "member_d_ptr": "*fp32"}
    inputs = {"z_ptr": f"*{student}", "idx_ptr": "*i32", "tlp_ptr": f"*{teacher}", "valid_ptr": "*i1"}
    coefficients = {"coef": "fp32", "tail_loss": "fp32", "tail_grad": "fp32"}
    forward = inputs | {"loss_ptr": "*fp32"} | stats | shapes | coefficients
    backward = {"tail_coef_ptr": "*fp32", "z_ptr": f"*{student}", "idx_ptr": "*i32", "valid_ptr": "*i1",
                "max_c_ptr": "*fp32", "logsum_c_ptr": "*fp32", "member_value_ptr": "*fp32", "label_coef_ptr": "*fp32",
                "labels_ptr": "*i64", "dz_ptr": f"*{student}"}  # fmt: skip
    return forward, backward | shapes


def sinkhorn_jobs(sinkhorn) -> dict[str, list]:
    """SINKHORN_VARIANTS -> [(kernel, signature, constexprs, (None, num_warps))] at kernels/sinkhorn.py's tiles."""
    block_n, block_m, num_warps = sinkhorn.SOFTMIN_TILE
    tile = {"BLOCK_N": block_n, "BLOCK_M": block_m}
    sizes = {"R": "i32", "S": "i32"}
    potentials = {"h_ptr": "*fp32", "logw_ptr": "*fp32", "out_ptr": "*fp32", "cbar_ptr": "*fp32"}
    strides = {name: "i64" for name in ("stride_xb", "stride_xi", "stride_xd", "stride_yb", "stride_yj", "stride_yd")}
    jobs = {}
    for dtype in ("fp32", "bf16"):
        sig = {"c_ptr": f"*{dtype}"} | potentials | sizes | {"stride_cb": "i64", "stride_ci": "i64", "stride_cj": "i64"}
        jobs[f"softmin-cost-{dtype}"] = [(sinkhorn.softmin_cost_kernel, sig | {"eps": "fp32"}, tile, (None, num_warps))]
        if dtype == "fp32":
            block_n_t, block_m_t, num_warps_t = sinkhorn.SOFTMIN_TILE_TRANSPOSED
            jobs["softmin-cost-fp32-transposed"] = [
                (
                    sinkhorn.softmin_cost_kernel,
                    sig | {"eps": "fp32"},
                    {"BLOCK_N": block_n_t, "BLOCK_M": block_m_t},
                    (None, num_warps_t),
                )
            ]
    for cost_fn in sinkhorn.COST_FNS:
        points = {"x_ptr": "*fp32", "y_ptr": "*fp32"}
        shapes = sizes | {"D": "i32"} | strides | {"eps": "fp32"}
        gradient = {"f_ptr": "*fp32", "g_ptr": "*fp32", "loga_ptr": "*fp32", "logb_ptr": "*fp32", "dx_ptr": "*fp32"}
        constexprs = tile | {"COST": sinkhorn.COST_FNS.index(cost_fn)}
        jobs[f"points-{cost_fn}"] = [
            (sinkhorn.softmin_points_kernel, points | potentials | shapes, constexprs, (None, num_warps)),
            (sinkhorn.points_gradient_kernel, points | gradient | shapes, constexprs, (None, num_warps)),
        ]
    block_n, block_m, block_v, num_warps = sinkhorn.L1_TILE
    stats = {name: "*fp32" for name in ("max_s_ptr", "logsum_s_ptr", "max_t_ptr", "logsum_t_ptr")}
    shapes = {"N": "i32", "V": "i32", "L": "i32", "stride_sb": "i64", "stride_sl": "i64", "stride_tb": "i64",
              "stride_tl": "i64", "inv_temperature": "fp32"}  # fmt: skip
    logits = {"zs_ptr": "*bf16", "zt_ptr": "*bf16"}
    constexprs = {"BLOCK_N": block_n, "BLOCK_M": block_m, "BLOCK_V": block_v}
    jobs["softmax-l1-bf16"] = [
        (sinkhorn.softmax_l1_cost_kernel, logits | stats | {"valid_ptr": "*i1", "w_ptr": "*fp32"} | shapes, constexprs,
         (None, num_warps)),
        (sinkhorn.softmax_l1_cost_backward_kernel, {"dw_ptr": "*fp32"} | logits | stats | {"g_ptr": "*fp32"} | shapes,
         constexprs, (None, num_warps)),
    ]  # fmt: skip
    return jobs


def loop_exps(ptx: str) -> list[int]:
    """ex2 instructions in the body of each loop of a PTX kernel (a label and a later branch back to it),
    in program order."""
    lines = ptx.splitlines()
    labels, counts = {}, []
    for i, line in enumerate(lines):
        label = re.match(r"^\s*(\$L__BB\d+_\d+):", line)
        if label:
            labels[label.group(1)] = i
        branch = re.search(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);", line)
        if branch and branch.group(1) in labels:
            counts.append(sum("ex2.approx" in body for body in lines[labels[branch.group(1)] : i]))
    return counts


def resource_usage(cubin: bytes) -> dict:
    """Registers and local memory (spill) bytes per thread, read from the cubin by cuobjdump (shipped in
    the triton wheel); {} when it is not there."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    return {"regs": int(re.search(r"REG:(\d+)", out).group(1)), "local": int(re.search(r"LOCAL:(\d+)", out).group(1))}


def compile_all() -> dict[str, dict]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from klops.kernels import distill, divergence, linear, linear_divergence, logprobs, sinkhorn, topk

    def compile_for(kernel, signature, constexprs, arch, sweep):
        """sweep: (BLOCK_V, num_warps) of a row kernel, or (None, num_warps[, num_stages]) of a tile kernel whose
        block sizes are in constexprs (its entries per thread are those of one BLOCK_N x BLOCK_M tile, or
        BLOCK_M x BLOCK_V for the fused-linear kernels)."""
        block_v, num_warps, *num_stages = sweep
        if block_v is not None:
            constexprs = {**constexprs, "BLOCK_V": block_v}
        signature = {**signature, **{name: "constexpr" for name in constexprs}}
        src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        options = {"num_warps": num_warps} | ({"num_stages": num_stages[0]} if num_stages else {})
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        assert len(compiled.asm["cubin"]) > 0, "empty cubin"
        if block_v is not None:
            tile = block_v
        elif "BLOCK_N" in constexprs:
            tile = constexprs["BLOCK_N"] * constexprs.get("BLOCK_M", constexprs.get("BLOCK_V", 1))
        else:
            tile = constexprs["BLOCK_M"] * constexprs["BLOCK_V"]
        entries_per_thread = tile / (32 * num_warps)
        return {
            "kernel": kernel.__name__, "arch": arch, "block_v": block_v, "num_warps": num_warps,
            **resource_usage(compiled.asm["cubin"]),
            "loop_exps_per_entry": [n / entries_per_thread for n in loop_exps(compiled.asm["ptx"])],
        }  # fmt: skip

    jobs = {}  # variant id -> [(kernel, signature, constexprs, arch, sweep), ...]
    for kind, target, student, teacher, labels in DIVERGENCE_VARIANTS:
        constexprs = {"KIND": DIVERGENCE_KINDS.index(kind), "TARGET": TARGET_KINDS.index(target)}
        for direction, kernel, sweep in (
            ("fwd", divergence.divergence_forward_kernel, FORWARD_SWEEP),
            ("bwd", divergence.divergence_backward_kernel, BACKWARD_SWEEP),
        ):
            if labels and direction == "fwd":
                continue
            sig = divergence_signature(student, teacher, direction == "bwd")
            extra = {"WITH_LABELS": labels == "labels"} if direction == "bwd" else {}
            name = "-".join(filter(None, ("divergence", kind, target, student, teacher, labels, direction)))
            jobs[name] = [(kernel, sig, constexprs | extra, 90, sweep)]
    common = ROW_ARGS | {"stride_zb": "i64", "stride_zl": "i64", "inv_temperature": "fp32", "ignore_index": "i64"}
    forward = {"z_ptr": "*bf16", "labels_ptr": "*i64", "logp_ptr": "*fp32", "entropy_ptr": "*fp32",
               "max_ptr": "*fp32", "logsum_ptr": "*fp32", "log_sum_sq_ptr": "*fp32", "mean_logit_ptr": "*fp32",
               "is_top1_ptr": "*fp32"}  # fmt: skip
    backward = {"grad_logp_ptr": "*fp32", "grad_entropy_ptr": "*fp32", "z_ptr": "*bf16", "labels_ptr": "*i64",
                "max_ptr": "*fp32", "logsum_ptr": "*fp32", "entropy_ptr": "*fp32", "dz_ptr": "*bf16"}  # fmt: skip
    for with_entropy, with_stats in LOGPROBS_VARIANTS:
        for arch in (80, 90):
            constexprs = {"WITH_ENTROPY": with_entropy}
            jobs[f"logprobs-{logprobs_flags(with_entropy, with_stats)}-sm{arch}"] = [
                (logprobs.logprobs_forward_kernel, forward | common, constexprs | {"WITH_STATS": with_stats}, arch,
                 FORWARD_SWEEP),
            ] + ([] if with_stats else [  # the backward does not read the stats
                (logprobs.logprobs_backward_kernel, backward | common, constexprs, arch, BACKWARD_SWEEP),
            ])  # fmt: skip
    for kind, tail, student, teacher, block in TOPK_VARIANTS:
        forward, _ = topk_signatures(student, teacher)
        constexprs = {"KIND": DIVERGENCE_KINDS.index(kind), "BIN": tail == "bin", "BLOCK_K": block}
        jobs[f"topk-{kind}-{tail}-{student}-{teacher}-k{block}"] = [
            (topk.topk_divergence_forward_kernel, forward, constexprs, 90, FORWARD_SWEEP)
        ]
    for dtype in ("bf16", "fp32"):
        for arch in (80, 90):
            _, backward = topk_signatures(dtype, dtype)
            jobs[f"topk-backward-{dtype}-sm{arch}"] = [
                (topk.topk_divergence_backward_kernel, backward, {"WITH_LABELS": False}, arch, BACKWARD_SWEEP)
            ]
    jobs["topk-backward-labels-bf16-sm90"] = [
        (topk.topk_divergence_backward_kernel, topk_signatures("bf16", "bf16")[1], {"WITH_LABELS": True}, 90,
         BACKWARD_SWEEP)
    ]  # fmt: skip
    for arch in (80, 90):
        for variant, job in sinkhorn_jobs(sinkhorn).items():
            jobs[f"sinkhorn-{variant}-sm{arch}"] = [(kernel, sig, constexprs, arch, sweep) for kernel, sig, constexprs,
                                                     sweep in job]  # fmt: skip
    for dtype in ("bf16", "fp32"):
        rows = {"z_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "valid_ptr": "*i1", "w_ptr": "*fp32", "kl_ptr": "*fp32"}
        strides = {name: "i64" for name in ("stride_zb", "stride_zl", "stride_yb", "stride_yl")}
        weights = rows | ROW_ARGS | strides | {"inv_temperature": "fp32", "mu": "fp32"}
        grads = {"grad_ptr": "*fp32", "z_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "valid_ptr": "*i1",
                 "kl_ptr": "*fp32", "dz_ptr": f"*{dtype}"}  # fmt: skip
        backward = grads | ROW_ARGS | strides | {"inv_temperature": "fp32"}
        for arch in (80, 90):
            for name, akl_weights in (("loss", True), ("kl-pair", False)):
                jobs[f"akl-{name}-{dtype}-sm{arch}"] = [
                    (distill.kl_pair_forward_kernel, weights, {"AKL_WEIGHTS": akl_weights}, arch,
                     distill.AKL_SWEEP if akl_weights else FORWARD_SWEEP),
                    (distill.kl_pair_backward_kernel, backward, {}, arch, BACKWARD_SWEEP),
                ]  # fmt: skip
    for variant in LINEAR_VARIANTS:
        for arch in (80, 90):
            jobs[f"linear-{linear_variant_name(variant)}-sm{arch}"] = [
                (kernel, sig, cx, arch, sweep) for kernel, sig, cx, sweep in linear_jobs(linear, variant)
            ]
    for variant in LINEAR_DIVERGENCE_VARIANTS:
        jobs[f"linear-divergence-{'-'.join(filter(None, variant))}"] = [
            (kernel, sig, constexprs, 90, sweep)
            for kernel, sig, constexprs, sweep in linear_divergence_jobs(linear_divergence, variant)
        ]
    results = {}
    for name, kernels in jobs.items():
        try:
            results[name] = {"status": "ok", "kernels": [compile_for(*job) for job in kernels]}
        except Exception as error:  # reported per variant by the test
            results[name] = {"status": f"{type(error).__name__}: {error}", "kernels": []}
    return results


def format_table(results: dict[str, dict]) -> str:
    lines = ["| variant | kernel | sm | BLOCK_V / warps | registers | local bytes | exp per entry, each loop |",
             "|---|---|---:|---:|---:|---:|---|"]  # fmt: skip
    for name, result in results.items():
        for k in result["kernels"] or [{"kernel": result["status"]}]:
            exps = ", ".join(f"{x:g}" for x in k.get("loop_exps_per_entry", []))
            lines.append(
                f"| {name} | {k['kernel']} | {k.get('arch', '')} | {k.get('block_v', '')} / {k.get('num_warps', '')} "
                f"| {k.get('regs', '?')} | {k.get('local', '?')} | {exps} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET=1"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    results = compile_all()
    print(format_table(results) if "--table" in sys.argv[1:] else json.dumps(results))
