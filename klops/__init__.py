"""klops: fused kernels for the losses of LLM post-training.

loss = klops.fused_kl(student_logits, teacher_logits, kind="forward")
logp, entropy = klops.logprobs(logits, labels, return_entropy=True)
"""

from . import nn, reference
from ._inputs import set_host_checks
from .backend import available_backends
from .divergence import fused_kl
from .logprobs import logprobs

__version__ = "0.1.0"
__all__ = ["fused_kl", "logprobs", "nn", "reference", "available_backends", "set_host_checks", "__version__"]
