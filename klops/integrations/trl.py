"""TRL 1.16's per-token log-probs, entropies and distillation divergences computed by klops's fused ops.

    import klops.integrations.trl
    klops.integrations.trl.patch()   # or: with klops.integrations.trl.patched(): trainer.train()

TRL 1.16 computes every trainer's per-token quantities through a few functions; ``patch()`` replaces each of them,
in every ``trl.*`` module that holds it (the helpers are imported by name into other modules), with a klops-backed
function of the same signature, outputs and dtypes:

- ``ChunkedLogProbFunction`` (``trl.kernels``, imported as ``trl.trainer.utils._ChunkedLogProbFunction``), which
  ``add_fused_lm_head`` calls for SFT, DPO, GRPO, RLOO and KTO: ``klops.fused_linear_logprobs``.
- ``ChunkedDivergenceFunction`` (``trl.kernels.chunked_divergence``, imported by ``DistillationTrainer``):
  ``klops.fused_linear_kl`` (and ``klops.fused_linear_logprobs`` for the entropy).
- ``selective_log_softmax``, ``entropy_from_logits``, ``selective_log_softmax_and_entropy`` of
  ``trl.trainer.utils``: ``klops.logprobs``.

``unpatch()`` puts TRL's objects back wherever a replacement stands. docs/integrations.md says what changes.
"""

import contextlib
import importlib
import inspect
import sys

import torch

import klops

__all__ = ["patch", "unpatch", "patched", "SUPPORTED"]

SUPPORTED = ">=1.16.0,<1.17.0"  # TRL 1.16.x: the versions whose contracts the replacements below follow
OPTIONAL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")  # trl.kernels.chunked_logprob's
ROW_STATS = ("log_sum_sq_probs", "mean_logits", "is_top1")  # no gradient in TRL's contract
IGNORE = -100  # the label klops skips; the helpers' row_mask == 0 rows are given it


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """TRL's compute dtype: autocast's when it is on for x's device, else x's; float64 (which TRL's chunked
    functions accumulate in fp32 anyway) becomes fp32, the widest dtype klops's ops take."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    return torch.float32 if dtype == torch.float64 else dtype


def _as(dtype: torch.dtype, *tensors):
    """The tensors in dtype (None stays None); the cast is differentiable, so gradients keep the inputs' dtypes."""
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def _check_not_zero3() -> None:
    # TRL's backward gathers a ZeRO-3 partitioned head again; klops's ops save the head's tensors in the forward
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        raise RuntimeError(
            "klops.integrations.trl does not support DeepSpeed ZeRO-3 (the LM head is partitioned again before the "
            "backward); call klops.integrations.trl.unpatch(), or shard with FSDP2"
        )


class ChunkedLogProbFunction:
    """``trl.kernels.ChunkedLogProbFunction`` on ``klops.fused_linear_logprobs``: ``apply`` takes and returns
    what TRL's does.

    With ``z = softcap(logit_scale (hidden @ weight.T + bias)) / temperature`` (``[N, V]``, never formed;
    ``softcap(x) = c tanh(x / c)`` with ``c = final_logit_softcapping``, none when None) and ``q = softmax(z)``,
    ``apply(hidden [N, H], weight [V, H], bias [V] | None, targets [N], temperature, chunk_size,
    final_logit_softcapping, logit_scale, outputs)`` returns five ``[N]`` tensors, each None unless named in
    ``outputs`` (``log_probs`` always):

    - ``log_probs = log q[target]`` (fp32, gradient to hidden, weight, bias);
    - ``entropy = -sum_v q_v log q_v`` (fp32, with gradient);
    - ``log_sum_sq_probs = log sum_v q_v^2``, ``mean_logits = mean_v z_v`` (fp32), ``is_top1``: the target is
      the first argmax of z (bool); these three without gradient.

    Inputs are cast to TRL's compute dtype (autocast's when on, else hidden's; float64 as fp32), gradients come
    back in the inputs' dtypes. ``chunk_size`` (TRL's vocabulary tile) is unused: klops chooses its own chunks.
    Targets must lie in ``[0, V)`` (TRL's callers clamp them or select the valid rows); a -100 target, klops's
    ignore_index, gives zeros where TRL's function would read outside the row.
    """

    @staticmethod
    def apply(
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        temperature: float,
        chunk_size: int,
        final_logit_softcapping: float | None = None,
        logit_scale: float = 1.0,
        outputs: tuple[str, ...] = OPTIONAL_OUTPUTS,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        unknown = [name for name in outputs if name not in ("log_probs", *OPTIONAL_OUTPUTS)]
        if unknown:
            raise ValueError(f"outputs: unknown per-token fields {unknown}; TRL's are log_probs, {OPTIONAL_OUTPUTS}")
        _check_not_zero3()
        dtype = _compute_dtype(hidden)
        with_entropy, with_stats = "entropy" in outputs, any(name in outputs for name in ROW_STATS)
        with torch.autocast(hidden.device.type, enabled=False):  # the products in TRL's compute dtype
            hidden, weight, bias = _as(dtype, hidden, weight, bias)
            result = klops.fused_linear_logprobs(
                hidden, weight, targets, bias=bias, temperature=temperature, softcap=final_logit_softcapping,
                logit_scale=logit_scale, return_entropy=with_entropy, return_row_stats=with_stats,
            )  # fmt: skip
        if with_stats:  # klops.LogprobOutputs
            log_probs, entropy, *stats = result
        elif with_entropy:
            (log_probs, entropy), stats = result, (None,) * 3
        else:
            log_probs, entropy, stats = result, None, (None,) * 3
        stats = [x.detach() if name in outputs else None for name, x in zip(ROW_STATS, stats)]
        return (log_probs, entropy, *stats)


class ChunkedDivergenceFunction:
    """``trl.kernels.chunked_divergence.ChunkedDivergenceFunction`` on ``klops.fused_linear_kl``: ``apply`` takes
    and returns what TRL's does.

    With ``z_s = softcap_s(scale_s (student_hidden @ student_weight.T + student_bias)) / temperature`` ([N, V],
    never formed), ``z_t`` the teacher's alike with its own scale and cap, ``q = softmax(z_s)`` (student) and
    ``p = softmax(z_t)`` (teacher), ``apply(student_hidden [N, Hs], student_weight [V, Hs], student_bias,
    teacher_hidden [N, Ht], teacher_weight [V, Ht], teacher_bias, beta, temperature, student_logit_scale,
    student_final_logit_softcapping, teacher_logit_scale, teacher_final_logit_softcapping)`` returns
    ``(divergence [N], entropy [N])``, both fp32:

    - ``divergence``: ``KL(p || q)`` for ``beta = 0``, ``KL(q || p)`` for ``beta = 1``, else the generalized JSD
      ``beta KL(p || m) + (1 - beta) KL(q || m)`` with ``m = beta p + (1 - beta) q`` (klops's kinds ``forward``,
      ``reverse``, ``jsd``); gradient to the student's hidden states, weight and bias only;
    - ``entropy = -sum_v q_v log q_v``, without gradient.

    Each model's inputs are cast to its compute dtype (autocast's when on, else its hidden states'; float64 as fp32).
    """

    @staticmethod
    def apply(
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        student_bias: torch.Tensor | None,
        teacher_hidden: torch.Tensor,
        teacher_weight: torch.Tensor,
        teacher_bias: torch.Tensor | None,
        beta: float,
        temperature: float = 1.0,
        student_logit_scale: float = 1.0,
        student_final_logit_softcapping: float | None = None,
        teacher_logit_scale: float = 1.0,
        teacher_final_logit_softcapping: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must lie in [0, 1] (0: forward KL, 1: reverse KL, else JSD), got {beta}")
        _check_not_zero3()
        kind = {0.0: "forward", 1.0: "reverse"}.get(beta, "jsd")
        student_dtype, teacher_dtype = _compute_dtype(student_hidden), _compute_dtype(teacher_hidden)
        head = dict(temperature=temperature, softcap=student_final_logit_softcapping, logit_scale=student_logit_scale)
        teacher = (teacher_hidden, teacher_weight, teacher_bias)
        with torch.autocast(student_hidden.device.type, enabled=False):  # the products in TRL's compute dtypes
            hidden, weight, bias = _as(student_dtype, student_hidden, student_weight, student_bias)
            t_hidden, t_weight, t_bias = _as(teacher_dtype, *(None if t is None else t.detach() for t in teacher))
            divergence = klops.fused_linear_kl(
                hidden, weight, t_hidden, t_weight, student_bias=bias, teacher_bias=t_bias, kind=kind,
                beta=beta if kind == "jsd" else None, teacher_softcap=teacher_final_logit_softcapping,
                teacher_logit_scale=teacher_logit_scale, reduction="none", **head,
            )  # fmt: skip
            # TRL's entropy has no gradient: a second klops call outside autograd (one more sweep of the student's
            # head, 2 N V Hs flops), since fused_linear_kl returns the divergence alone
            with torch.no_grad():
                labels = torch.zeros(hidden.shape[:-1], dtype=torch.long, device=hidden.device)
                _, entropy = klops.fused_linear_logprobs(hidden, weight, labels, bias=bias, return_entropy=True, **head)
        return divergence, entropy


def _logits_rows(logits: torch.Tensor, index: torch.Tensor, temperature: float, row_mask, with_entropy: bool):
    """klops.logprobs of logits [..., V] at index [...] (fp32; and the entropy): row_mask == 0 rows give 0."""
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    if logits.dtype == torch.float64:  # klops computes in fp32; the results are cast back to float64
        logits = logits.float()
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if row_mask is not None:
        index = torch.where(row_mask == 0, IGNORE, index)
    return klops.logprobs(logits, index, temperature=temperature, return_entropy=with_entropy, ignore_index=IGNORE)


def _out_dtype(logits: torch.Tensor, index=None, row_mask=None) -> torch.dtype:
    """The dtype TRL's helpers return: fp32 where TRL takes its Triton kernel (CUDA / XPU), else the logits'."""
    from trl.trainer.utils import _supports_trl_loss_kernel, is_triton_available

    fused = is_triton_available() and _supports_trl_loss_kernel(logits, index, row_mask)
    return torch.float32 if fused else logits.dtype


def selective_log_softmax(
    logits: torch.Tensor, index: torch.Tensor, temperature: float = 1.0, row_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """TRL's ``selective_log_softmax`` on ``klops.logprobs``: ``log softmax(logits / T)`` gathered at ``index``.

    ``logits [..., V]`` with ``index [...]`` (one label per row) or ``[..., K]`` (K labels per row, read from the
    same logits row without a copy); ``row_mask`` (``index``'s shape) zeroes the rows where it is 0. Returns
    ``index``'s shape, in TRL's dtype (the logits', fp32 on its Triton path; float64 computed in fp32).
    """
    dtype = _out_dtype(logits, index, row_mask)
    if index.dim() == logits.dim():
        if index.shape[:-1] != logits.shape[:-1]:
            raise ValueError(
                f"index of shape {tuple(index.shape)} must have the rows {tuple(logits.shape[:-1])} of logits"
            )
        logits = logits.unsqueeze(-2).expand(*index.shape, logits.shape[-1])  # K rows reading one row
    return _logits_rows(logits, index, temperature, row_mask, False).to(dtype)


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """TRL's ``entropy_from_logits`` on ``klops.logprobs``: ``-sum_v q_v log q_v`` with ``q = softmax(logits)``,
    ``logits [..., V]`` -> ``[...]`` in TRL's dtype. ``chunk_size`` (TRL's rows per step) is unused."""
    index = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return _logits_rows(logits, index, 1.0, None, True)[1].to(_out_dtype(logits, index))


def selective_log_softmax_and_entropy(
    logits: torch.Tensor,
    index: torch.Tensor,
    entropy_requires_grad: bool = True,
    temperature: float = 1.0,
    row_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's ``selective_log_softmax_and_entropy`` on one ``klops.logprobs`` call: ``(log q[index], -sum q log q)``
    with ``q = softmax(logits / T)``, ``logits [..., V]``, ``index [...]``; both 0 where ``row_mask`` is 0; the
    entropy detached unless ``entropy_requires_grad``. Returns two ``[...]`` tensors in TRL's dtype."""
    if index.shape != logits.shape[:-1]:
        raise ValueError(f"index must have shape {tuple(logits.shape[:-1])} (the rows of logits), got {index.shape}")
    dtype = _out_dtype(logits, index, row_mask)
    logprobs, entropy = _logits_rows(logits, index, temperature, row_mask, True)
    return logprobs.to(dtype), (entropy if entropy_requires_grad else entropy.detach()).to(dtype)


# ----------------------------------------------------------------------------------------------------
# patching

# Where TRL defines each original: (module, attribute) -> its replacement
_REPLACEMENTS = {
    ("trl.kernels.chunked_logprob", "ChunkedLogProbFunction"): ChunkedLogProbFunction,
    ("trl.kernels.chunked_divergence", "ChunkedDivergenceFunction"): ChunkedDivergenceFunction,
    ("trl.trainer.utils", "selective_log_softmax"): selective_log_softmax,
    ("trl.trainer.utils", "entropy_from_logits"): entropy_from_logits,
    ("trl.trainer.utils", "selective_log_softmax_and_entropy"): selective_log_softmax_and_entropy,
}
_pairs: list[tuple[object, object]] = []  # (TRL's original, its replacement), found by the first patch()


def _parameters(fn, drop_ctx: bool = False) -> list[tuple[str, object, object]]:
    params = list(inspect.signature(fn).parameters.values())[1 if drop_ctx else 0 :]
    return [(p.name, p.kind, p.default) for p in params]


def _originals_and_replacements() -> list[tuple[object, object]]:
    """(TRL's original, its replacement) pairs, after checking TRL's version and the originals' signatures."""
    try:
        import trl
    except ImportError as error:
        raise ImportError(f"klops.integrations.trl needs TRL {SUPPORTED}: pip install 'trl{SUPPORTED}'") from error
    from packaging.specifiers import SpecifierSet

    if trl.__version__ not in SpecifierSet(SUPPORTED, prereleases=True):
        raise RuntimeError(
            f"klops.integrations.trl supports TRL {SUPPORTED} (1.16.x), whose functions it replaces; found TRL "
            f"{trl.__version__}. Install a supported TRL, or leave TRL unpatched."
        )
    if _pairs:
        return _pairs
    pairs = []
    for (module_name, name), replacement in _REPLACEMENTS.items():
        original = getattr(importlib.import_module(module_name), name)
        if isinstance(original, type) and issubclass(original, torch.autograd.Function):
            found, expected = _parameters(original.forward, drop_ctx=True), _parameters(replacement.apply)
        else:
            found, expected = _parameters(original), _parameters(replacement)
        if found != expected:
            raise RuntimeError(
                f"klops.integrations.trl supports TRL {SUPPORTED}: {module_name}.{name} of TRL {trl.__version__} "
                f"does not have the signature {[p[0] for p in expected]} that its replacement follows"
            )
        pairs.append((original, replacement))
    _pairs.extend(pairs)
    return _pairs


def _swap(pairs: list[tuple[object, object]]) -> None:
    """In every imported trl.* module, each attribute that is the first object of a pair becomes the second."""
    new_of = {id(old): (old, new) for old, new in pairs}
    for name, module in list(sys.modules.items()):
        if name != "trl" and not name.startswith("trl."):
            continue
        for attribute, value in list(vars(module).items()):
            match = new_of.get(id(value))
            if match is not None and match[0] is value:
                setattr(module, attribute, match[1])


def patch() -> None:
    """Replace TRL's per-token functions by klops's in every imported ``trl.*`` module (the module docstring lists
    them). Modules imported later take the replacements from the patched ones. Calling it again is harmless; a TRL
    outside ``SUPPORTED``, or one whose functions have other signatures, raises before anything is replaced."""
    _swap(_originals_and_replacements())


def unpatch() -> None:
    """Put TRL's originals back wherever a klops replacement stands; harmless when nothing is patched."""
    _swap([(new, old) for old, new in _pairs])


@contextlib.contextmanager
def patched():
    """``patch()`` on entry, ``unpatch()`` on exit."""
    patch()
    try:
        yield
    finally:
        unpatch()
