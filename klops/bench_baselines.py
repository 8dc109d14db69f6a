"""The baselines ``klops bench`` times each op against: plain PyTorch as a trainer writes it without klops (eager,
and ``torch.compile`` of the same function, made in ``bench.implementations``), PyTorch's own fused-linear
cross-entropy ``torch.nn.functional.linear_cross_entropy`` in both its modes, and the libraries found installed:
Liger-Kernel and Cut Cross-Entropy (POT's Sinkhorn is in ``bench_sinkhorn``).

Each baseline is a callable ``(logits or hidden, inputs) -> scalar loss`` with the klops case's loss (mean over the
rows; batchmean for the KL), named so that ``baseline_family`` gives its ``--baselines`` family. ``klops_backends``
says which klops backends a case is measured on, the other side of the comparison.
"""

import importlib.util

import torch
import torch.nn.functional as F

from .backend import available_backends, resolve

# The families of ``klops bench --baselines``: plain PyTorch, torch.compile of it, PyTorch's linear_cross_entropy,
# Liger-Kernel, Cut Cross-Entropy, POT; each with the prefix of its implementations' names (eager: all the others).
BASELINES = ("eager", "compile", "lce", "liger", "cce", "pot")
FAMILY_PREFIXES = (("torch.compile", "compile"), ("F.linear_cross_entropy", "lce"), ("liger", "liger"),
                   ("cut-cross", "cce"), ("POT", "pot"))  # fmt: skip


def baseline_family(impl: str) -> str | None:
    """What ``klops bench --baselines`` calls an implementation: one of BASELINES; None for klops."""
    if impl.startswith("klops"):
        return None
    for prefix, family in FAMILY_PREFIXES:
        if impl.startswith(prefix):
            return family
    return "eager"  # the plain PyTorch ways: eager ops, loops, published code


def klops_backends(family: str, device: torch.device, **sizes) -> list[str]:
    """The klops backends that the baselines are measured against for an op of ``family`` (a key of
    klops.backend.PREFERENCES) at ``sizes`` (``vocab``, ``dtype``): those usable on ``device`` that ``resolve`` takes
    by name; an op can lack CUDA or C++ CPU kernels, or a backend not take a size."""
    names = []
    for backend in available_backends(device):
        try:
            names.append(resolve(family, backend, device, **sizes))
        except ValueError:
            continue
    return names


# Sequences of the tdpo_loss / dckd_loss cases (the pairs (0, 1) and (2, 3); 0 and 2 are chosen) and of the
# fused_linear_grpo_loss case.
SEQUENCES = 4


def grpo_batch(hidden, inputs):
    """The fused_linear_grpo_loss case's rows as SEQUENCES sequences: (hidden [S, L, D], weight, ids [S, L],
    advantages [S], mask [S, L] of ones)."""
    weight, labels, advantages = inputs
    ids = labels.view(SEQUENCES, -1)
    return hidden.view(SEQUENCES, -1, hidden.shape[-1]), weight, ids, advantages, torch.ones_like(ids)


# ----------------------------------------------------------------------------------------------------
# plain PyTorch baselines (what a trainer writes without klops)


def eager_kl(student, teacher, kind: str):
    log_q = F.log_softmax(student.float(), dim=-1)
    log_p = F.log_softmax(teacher.float(), dim=-1)
    if kind == "forward":
        return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
    if kind == "reverse":
        return F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")
    log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - torch.log(torch.tensor(2.0))
    kl_pm = F.kl_div(log_m, log_p, log_target=True, reduction="batchmean")
    kl_qm = F.kl_div(log_m, log_q, log_target=True, reduction="batchmean")
    return 0.5 * kl_pm + 0.5 * kl_qm


def eager_topk_rows(log_q, indices, logprobs):
    """Per-row forward KL against a top-k teacher with a tail bin, the plain way: a gather from the full
    log_softmax, and the student's tail as 1 - sum q_S."""
    log_q_s = log_q.gather(-1, indices)
    log_tail_q = torch.log(-torch.expm1(torch.logsumexp(log_q_s, dim=-1)))
    p_s = logprobs.exp()
    tail_p = (1 - p_s.sum(-1)).clamp(min=0)
    return (p_s * (logprobs - log_q_s)).sum(-1) + torch.xlogy(tail_p, tail_p) - tail_p * log_tail_q


def eager_topk_kl(student, teacher):
    indices, logprobs, _ = teacher
    return eager_topk_rows(F.log_softmax(student.float(), dim=-1), indices, logprobs).mean()


def eager_tdpo(policy, inputs):
    """TDPO2 as its authors' code computes it: both full log_softmaxes, the per-position KL, gathers."""
    ref, labels, chosen, rejected = inputs
    keep, idx = labels != -100, labels.clamp(min=0)[..., None]
    log_q, log_p = F.log_softmax(policy.float(), dim=-1), F.log_softmax(ref.float(), dim=-1)
    seq_kl = ((log_p.exp() * (log_p - log_q)).sum(-1) * keep).sum(-1)
    margin = ((log_q.gather(-1, idx) - log_p.gather(-1, idx)).squeeze(-1) * keep).sum(-1)
    logits = margin[chosen] - margin[rejected] - 0.5 * (seq_kl[rejected] - seq_kl[chosen].detach())
    return -F.logsigmoid(0.1 * logits).mean()


def eager_dckd(student, inputs):
    """DCKD the plain way: NLL on chosen tokens plus the top-k + tail-bin KL on chosen and rejected tokens."""
    indices, logprobs, labels, chosen = inputs
    log_q = F.log_softmax(student.float(), dim=-1)
    keep = labels != -100
    nll = -log_q.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    kl = eager_topk_rows(log_q, indices, logprobs)
    on_chosen, on_rejected = keep & chosen[:, None], keep & ~chosen[:, None]

    def mean(x, m):
        return (x * m).sum() / m.sum().clamp(min=1)

    return mean(nll, on_chosen) + mean(kl, on_chosen) + mean(kl, on_rejected)


def eager_forward_reverse_kl(student, teacher):
    """Per row KL(p || q) and KL(q || p) from the two log-softmaxes, as a trainer mixing them writes it."""
    log_q, log_p = F.log_softmax(student.float(), dim=-1), F.log_softmax(teacher.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1), (log_q.exp() * (log_q - log_p)).sum(-1)


def eager_akl(student, teacher):
    """AKL as its authors' code computes it: a sort of the teacher's probabilities for the head / tail ratios,
    then the two KLs weighted per token."""
    log_q, log_p = F.log_softmax(student.float(), dim=-1), F.log_softmax(teacher.float(), dim=-1)
    p, q = log_p.exp(), log_q.exp().detach()
    p_sorted, order = p.sort(dim=-1, descending=True)
    errors = (p_sorted - q.gather(-1, order)).abs()
    tail = p_sorted.cumsum(-1) > 0.5
    tail[:, 0] = False
    s1, s2 = (errors * ~tail).sum(-1), (errors * tail).sum(-1)
    forward, reverse = (p * (log_p - log_q)).sum(-1), (log_q.exp() * (log_q - log_p)).sum(-1)
    return (s1 / (s1 + s2) * forward + s2 / (s1 + s2) * reverse).mean()


def eager_logprobs(logits, labels):
    """mean log-prob of the labels minus mean entropy (both terms negative: the check against the reference is
    not a difference of two numbers near 10)."""
    log_q = F.log_softmax(logits.float(), dim=-1)
    logp = log_q.gather(-1, labels[:, None]).squeeze(-1)
    entropy = -(log_q.exp() * log_q).sum(-1)
    return logp.mean() - entropy.mean()


def eager_linear_cross_entropy(hidden, weight_and_labels):
    weight, labels = weight_and_labels
    return F.cross_entropy((hidden @ weight.t()).float(), labels)


def eager_linear_kl(hidden, heads, kind: str):
    """heads: (weight, teacher hidden states, teacher head), or (weight, teacher logits)."""
    weight, *teacher = heads
    teacher_logits = teacher[0] if len(teacher) == 1 else teacher[0] @ teacher[1].t()
    return eager_kl(hidden @ weight.t(), teacher_logits, kind)


def eager_linear_logprobs(hidden, weight_and_labels):
    weight, labels = weight_and_labels
    return eager_logprobs(hidden @ weight.t(), labels)


def eager_linear_grpo(hidden, inputs):
    """GRPO (dapo aggregation, one policy step: old log-probs = the detached ones) the plain way: logits,
    log_softmax, gather, the clipped surrogate."""
    hidden, weight, ids, advantages, mask = grpo_batch(hidden, inputs)
    logp = F.log_softmax((hidden @ weight.t()).float(), dim=-1).gather(-1, ids[..., None])[..., 0]
    ratio = torch.exp(logp - logp.detach())
    a = advantages[:, None]
    per_token = -torch.min(ratio * a, ratio.clamp(0.8, 1.2) * a)
    return (per_token * mask).sum() / mask.sum()


# ----------------------------------------------------------------------------------------------------
# PyTorch's fused-linear cross-entropy and the libraries


def torch_linear_cross_entropy(case) -> dict:
    """PyTorch's own ``F.linear_cross_entropy(hidden, weight, labels)`` (torch 2.13+) for the
    fused_linear_cross_entropy cases, in its two modes: the default (``options=None``: ``F.linear`` then
    ``F.cross_entropy``, the [N, V] logits in the input dtype) and the chunked one
    (``options=torch.nn.LinearCrossEntropyOptions()`` at its defaults: rows in chunks whose logits are about the size
    of the hidden states, ``acc_policy`` and ``chunking_method`` "auto"; the gradients are formed in the forward and
    scaled in the backward). Neither on a torch without it (``lce_missing`` says why)."""
    if case.op != "fused_linear_cross_entropy" or lce_missing() is not None:
        return {}
    chunked = torch.nn.LinearCrossEntropyOptions()
    return {
        "F.linear_cross_entropy": lambda h, y: F.linear_cross_entropy(h, y[0], y[1]),
        "F.linear_cross_entropy chunked": lambda h, y: F.linear_cross_entropy(h, y[0], y[1], options=chunked),
    }


def lce_missing() -> str | None:
    """Why the lce baseline cannot run with this torch (it came in 2.13), or None where it can."""
    if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return None
    return f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy (new in torch 2.13)"


def library_baselines(case) -> dict:
    """The losses of Liger-Kernel (its JSD on log-probs and its fused linear JSD: forward KL at beta = 0, reverse at
    1; its fused linear cross-entropy and chunked GRPO loss) and of Cut Cross-Entropy, for the cases they share and
    each only if importable: name -> callable(logits or hidden, inputs) with the klops case's loss (mean over the
    rows; batchmean for the KL)."""
    impls = {}
    jsd_beta = {"forward": 0.0, "reverse": 1.0, "jsd": 0.5}.get(getattr(case, "kind", None))
    if case.op == "fused_kl" and jsd_beta is not None and importlib.util.find_spec("liger_kernel") is not None:
        from liger_kernel.transformers import LigerJSD

        liger_logits_jsd = LigerJSD(beta=jsd_beta)
        # Liger's JSD takes log-probs: the log_softmax of both logits is part of its time and memory.
        impls["liger-kernel (log_softmax + JSD)"] = lambda z, y: liger_logits_jsd(
            F.log_softmax(z.float(), dim=-1), F.log_softmax(y.float(), dim=-1)
        )
    elif case.op == "fused_linear_cross_entropy":
        if importlib.util.find_spec("liger_kernel") is not None:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            liger_ce = LigerFusedLinearCrossEntropyLoss()
            impls["liger-kernel"] = lambda h, y: liger_ce(y[0], h, y[1])
        if importlib.util.find_spec("cut_cross_entropy") is not None:
            from cut_cross_entropy import linear_cross_entropy

            impls["cut-cross-entropy"] = lambda h, y: linear_cross_entropy(
                h, y[0], y[1], impl="cce" if h.is_cuda else "torch_compile"
            )
    elif case.op == "fused_linear_kl" and jsd_beta is not None and not case.teacher_logits:
        if importlib.util.find_spec("liger_kernel") is not None:
            from liger_kernel.transformers import LigerFusedLinearJSD

            liger_jsd = LigerFusedLinearJSD(jsd_beta=jsd_beta)
            impls["liger-kernel"] = lambda h, y: liger_jsd(h, y[0], y[1], y[2], None)
    elif case.op == "fused_linear_grpo_loss" and importlib.util.find_spec("liger_kernel") is not None:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        liger_grpo = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="dapo")

        def liger(h, y):  # no old log-probs: one policy step, as the klops case
            hidden, weight, ids, advantages, mask = grpo_batch(h, y)
            out = liger_grpo(hidden, weight, ids, mask, advantages)
            return out[0] if isinstance(out, tuple) else out

        impls["liger-kernel"] = liger
    return impls
