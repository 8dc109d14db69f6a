"""Bad input raises a clear error naming the argument, before any kernel runs."""

import pytest
import torch

import klops

Z = torch.randn(4, 10)
Y = torch.randn(4, 10)
LABELS = torch.randint(0, 10, (4,))

FUSED_KL_CASES = [
    (dict(teacher_logits=torch.randn(4, 11)), ValueError, "vocabulary mismatch.*V=10.*V=11"),
    (dict(teacher_logits=torch.randn(5, 10)), ValueError, "teacher_logits must have the shape"),
    (dict(student_logits=torch.randint(0, 3, (4, 10))), TypeError, "student_logits must have dtype"),
    (dict(teacher_logits=torch.randn(4, 10, dtype=torch.float64)), TypeError, "teacher_logits must have dtype"),
    (dict(student_logits=[[1.0]]), TypeError, "student_logits must be a torch.Tensor"),
    (dict(student_logits=torch.randn(10, 4).t()), ValueError, "stride 1 in its last"),
    (dict(student_logits=torch.randn(4, 0), teacher_logits=torch.randn(4, 0)), ValueError, "V >= 1"),
    (dict(kind="kl"), ValueError, "kind must be one of"),
    (dict(kind="jsd", beta=1.5), ValueError, r"beta must lie in \[0.0, 1.0\]"),
    (dict(kind="jsd", beta="0.5"), TypeError, "beta must be a Python float"),
    (dict(kind="skew_forward", alpha=-0.1), ValueError, "alpha must lie in"),
    (dict(kind="skew_forward", beta=0.1), ValueError, "kind='skew_forward' takes alpha, not beta=0.1"),
    (dict(kind="jsd", alpha=0.1), ValueError, "kind='jsd' takes beta, not alpha=0.1"),
    (dict(kind="forward", beta=0.5), ValueError, "kind='forward' takes no coefficient.*got beta=0.5"),
    (dict(kind="tv", alpha=0.5), ValueError, "kind='tv' takes no coefficient.*got alpha=0.5"),
    (dict(reduction="none", num_items=8), ValueError, 'num_items.*reduction="none"'),
    (dict(kind="alpha", alpha=1.0), ValueError, "alpha must not be 0 or 1"),
    (dict(kind="alpha", alpha=float("nan")), ValueError, "alpha must lie in"),
    (dict(temperature=0.0), ValueError, "temperature must lie in"),
    (dict(temperature=-1.0), ValueError, "temperature must lie in"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(target_is="probabilities"), ValueError, "target_is must be one of"),
    (dict(labels=torch.randint(0, 10, (4, 1))), ValueError, r"labels must have shape \(4,\)"),
    (dict(labels=torch.randn(4)), TypeError, "labels must be an integer tensor"),
    (dict(labels=torch.ones(4, dtype=torch.bool)), TypeError, "labels must be an integer tensor"),
    (dict(labels=torch.tensor([0, 1, 10, 2])), ValueError, r"labels must lie in \[0, 10\).*got 10"),
    (dict(labels=torch.tensor([0, -1, 3, 2])), ValueError, "labels must lie in.*got -1"),
    (dict(mask=torch.ones(2, 2)), ValueError, r"mask must have shape \(4,\)"),
    (dict(weights=torch.ones(3)), ValueError, r"weights must have shape \(4,\)"),
    (dict(num_items=0), ValueError, "num_items must be a positive int"),
    (dict(num_items=torch.ones(2)), ValueError, "num_items must be an int or a 0-d tensor"),
    (dict(backend="cutlass"), ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("overrides, error, message", FUSED_KL_CASES)
def test_fused_kl_rejects(overrides, error, message):
    kw = {"student_logits": Z, "teacher_logits": Y, **overrides}
    with pytest.raises(error, match=message):
        klops.fused_kl(**kw)


LOGPROBS_CASES = [
    (dict(logits=torch.randint(0, 3, (4, 10))), TypeError, "logits must have dtype"),
    (dict(labels=torch.randint(0, 10, (3,))), ValueError, r"labels must have shape \(4,\)"),
    (dict(labels=LABELS.float()), TypeError, "labels must be an integer tensor"),
    (dict(labels=torch.tensor([0, 1, 2, 10])), ValueError, "labels must lie in"),
    (dict(temperature=float("inf")), ValueError, "temperature must lie in"),
    (dict(return_entropy=1), TypeError, "return_entropy must be a bool"),
    (dict(backend="nope"), ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("overrides, error, message", LOGPROBS_CASES)
def test_logprobs_rejects(overrides, error, message):
    kw = {"logits": Z, "labels": LABELS, **overrides}
    with pytest.raises(error, match=message):
        klops.logprobs(**kw)


def test_unavailable_backend_is_named():
    """The CUDA extension never runs on CPU tensors: the error says which backends can."""
    with pytest.raises(ValueError, match="backend='cuda' cannot run on cpu tensors here"):
        klops.fused_kl(Z, Y, backend="cuda")


def test_custom_ignore_index_is_allowed():
    labels = torch.tensor([0, 7, -1, 3])
    loss = klops.fused_kl(Z, Y, labels=labels, ignore_index=-1, reduction="none")
    assert loss[2].item() == 0.0 and loss[0].item() > 0.0


def test_label_check_of_gpu_tensors_never_syncs():
    """Off the CPU the range check is a device-side assertion: on meta tensors, whose values cannot be
    read, it runs without reading them; set_host_checks(True) reads them (and fails here, on meta)."""
    labels = torch.tensor([1, 50, -100], device="meta")
    klops._inputs.check_labels_in_range("labels", labels, 10, -100)
    klops.set_host_checks(True)
    try:
        with pytest.raises(RuntimeError, match="meta"):
            klops._inputs.check_labels_in_range("labels", labels, 10, -100)
    finally:
        klops.set_host_checks(False)
    with pytest.raises(TypeError, match="enabled must be a bool"):
        klops.set_host_checks(1)


@pytest.mark.parametrize("op", ["logprobs", "fused_kl"])
def test_compiled_label_check(op):
    """Under torch.compile the label check is not skipped: a device-side assertion (RuntimeError on CPU)."""
    torch._dynamo.reset()
    bad = torch.tensor([0, 1, 10, 2])

    def loss(z, labels):
        if op == "logprobs":
            return klops.logprobs(z, labels, backend="torch").sum()
        return klops.fused_kl(z, Y, labels=labels, backend="torch")

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    assert torch.isfinite(compiled(Z, LABELS))
    with pytest.raises(RuntimeError, match=r"labels must lie in \[0, 10\)"):
        compiled(Z, bad)
