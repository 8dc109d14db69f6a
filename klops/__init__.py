"""klops: fused kernels for the losses of LLM post-training.

loss = klops.fused_kl(student_logits, teacher_logits, kind="forward")
logp, entropy = klops.logprobs(logits, labels, return_entropy=True)
loss = klops.fused_kl(student_logits, klops.TopK(teacher_ids, teacher_logprobs, tail="bin"), kind="forward")
loss = klops.sinkhorn_distill_loss(student_logits, teacher_logits)
"""

# _checkout first: it makes klops.kernels in a checkout; the vocab_parallel modules register their ops' forms
# (klops/distributed.py)
from . import (  # noqa: F401
    _checkout,
    _eager,
    distributed,
    nn,
    reference,
    vocab_parallel,
    vocab_parallel_distill,
    vocab_parallel_linear,
    vocab_parallel_rl,
)
from ._inputs import set_host_checks
from .backend import available_backends
from .distill import akl_loss, akl_weights, dckd_loss, forward_reverse_kl, kdrl_loss
from .divergence import divergence_and_label_logprobs, fused_kl
from .grpo import group_advantages, grpo_loss, grpo_loss_from_logits, kl_estimate
from .linear import fused_linear_cross_entropy, fused_linear_logprobs
from .linear_divergence import fused_linear_kl
from .linear_grpo import fused_linear_grpo_loss
from .logprobs import LogprobOutputs, logprobs
from .preference import dpo_loss, sequence_logprobs, tdpo_loss
from .sinkhorn import SinkhornConvergenceWarning, SinkhornResult, sinkhorn, sinkhorn_distill_loss, sinkhorn_divergence
from .topk import TopK

_eager.import_dynamo_lazily(__name__)  # the first eager call imports neither torch._dynamo nor triton

__version__ = "0.1.0"
__all__ = [
    "fused_kl", "TopK", "divergence_and_label_logprobs", "logprobs", "LogprobOutputs", "fused_linear_kl",
    "fused_linear_logprobs",
    "fused_linear_cross_entropy",
    "fused_linear_grpo_loss", "group_advantages", "kl_estimate",
    "grpo_loss", "grpo_loss_from_logits", "dpo_loss", "sequence_logprobs", "tdpo_loss", "dckd_loss", "kdrl_loss",
    "akl_loss", "akl_weights", "forward_reverse_kl",
    "sinkhorn", "sinkhorn_divergence", "sinkhorn_distill_loss", "SinkhornResult", "SinkhornConvergenceWarning",
    "nn", "reference", "distributed", "available_backends", "set_host_checks", "__version__",
]  # fmt: skip
