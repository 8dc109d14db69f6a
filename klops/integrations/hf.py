"""What klops's fused-linear ops need from a Hugging Face causal LM, without its ``[B, L, V]`` logits.

A causal LM computes ``logits = softcap(c (h W^T + b))``: ``h [B, L, D]`` the backbone's last hidden states, ``W
[V, D]`` and ``b [V]`` the LM head, ``c`` a logit scale and ``softcap(x) = s tanh(x / s)`` Gemma-2's final soft
cap. ``lm_head(model)`` reads ``W``, ``b``, ``s`` and ``c`` (from the same config fields as TRL 1.16's
``add_fused_lm_head``), ``last_hidden_states(model, ...)`` runs the backbone only, and the head's ``kwargs()``
hand them to ``klops.fused_linear_cross_entropy`` / ``fused_linear_logprobs`` (``student_kwargs()`` /
``teacher_kwargs()`` to ``klops.fused_linear_kl``)::

    head = klops.integrations.hf.lm_head(model)
    hidden = klops.integrations.hf.last_hidden_states(model, input_ids=ids, attention_mask=mask)
    loss = klops.fused_linear_cross_entropy(hidden[:, :-1], head.weight, labels[:, 1:], **head.kwargs())

Tied embeddings (the head's weight is the input embedding's) and PEFT-wrapped models need nothing special. An
FSDP2 head, whose weight is a ``DTensor`` sharded over the ranks, is gathered once per ``lm_head`` call (its
backward reduce-scatters the gradient), never once per chunk of rows. ``last_hidden_states`` calls the backbone
directly, bypassing the model's own ``forward``: where FSDP2 shards the root module (``fully_shard(model)``), whose
pre-forward hook gathers the embeddings, call it from inside the model's forward, as TRL's patched forward does.
"""

from dataclasses import dataclass

import torch

__all__ = ["LMHead", "lm_head", "last_hidden_states", "logit_scale"]


@dataclass(frozen=True)
class LMHead:
    """A causal LM's head as klops's fused-linear ops take it: ``logits = softcap(logit_scale (h weight^T +
    bias))``, with ``weight [V, D]`` a plain tensor (gathered if the model's is a DTensor) and ``bias [V]`` or
    None."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    softcap: float | None
    logit_scale: float

    def kwargs(self) -> dict:
        """The keyword arguments of ``fused_linear_cross_entropy`` / ``fused_linear_logprobs`` for this head."""
        return {"bias": self.bias, "softcap": self.softcap, "logit_scale": self.logit_scale}

    def student_kwargs(self) -> dict:
        """The student's keyword arguments of ``fused_linear_kl`` (its weight is the second positional one)."""
        return {"student_bias": self.bias, "softcap": self.softcap, "logit_scale": self.logit_scale}

    def teacher_kwargs(self) -> dict:
        """The teacher's keyword arguments of ``fused_linear_kl`` (its weight is the fourth positional one)."""
        return {"teacher_bias": self.bias, "teacher_softcap": self.softcap, "teacher_logit_scale": self.logit_scale}


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT wrapper (its LoRA layers in place), else the model itself."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def logit_scale(config) -> float:
    """The multiplier of a model's logits before the soft cap, read as TRL 1.16 reads it: ``logit_scale``
    (Cohere), ``output_multiplier``, ``lm_head_multiplier`` (Falcon-H1), ``logits_scaling`` (Granite and
    MiniCPM3 divide by it, HyperCLOVA X multiplies); 1.0 when none is set (a set 0.0 is kept)."""
    text_config = config.get_text_config()
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(text_config, name, None)
        if value is not None:
            return float(value)
    scaling = getattr(text_config, "logits_scaling", None)
    if scaling is None:
        return 1.0
    return float(scaling) if text_config.model_type == "hyperclovax" else 1.0 / float(scaling)


def _gathered(x: torch.Tensor | None) -> torch.Tensor | None:
    """A DTensor (an FSDP2 shard) as the full tensor, once: differentiable, its backward reduce-scatters."""
    if x is None or not torch.distributed.is_available():
        return x
    from torch.distributed.tensor import DTensor

    return x.full_tensor() if isinstance(x, DTensor) else x


def lm_head(model: torch.nn.Module) -> LMHead:
    """The head of a Hugging Face causal LM (``PreTrainedModel`` or a PEFT wrapper of one): its output
    embedding's weight and bias, ``config.final_logit_softcapping`` and ``logit_scale(config)``. The head must be
    a plain ``torch.nn.Linear`` (a LoRA adapter on it would be left out of the fused logits: merge it first)."""
    model = _unwrapped(model)
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    head = get_output_embeddings() if callable(get_output_embeddings) else None
    if not isinstance(head, torch.nn.Linear) or hasattr(head, "lora_A") or hasattr(head, "base_layer"):
        raise ValueError(
            f"model must be a Hugging Face causal LM whose output embedding is a plain torch.nn.Linear, got "
            f"{type(head).__name__} (a LoRA adapter on the LM head: merge it, or leave lm_head out of "
            "target_modules)"
        )
    softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    return LMHead(
        weight=_gathered(head.weight),
        bias=_gathered(head.bias),
        softcap=None if softcap is None else float(softcap),
        logit_scale=logit_scale(model.config),
    )


def last_hidden_states(model: torch.nn.Module, *args, **inputs) -> torch.Tensor:
    """The backbone's last hidden states ``[B, L, D]`` of a Hugging Face causal LM (or a PEFT wrapper of one) on
    ``inputs`` (``input_ids``, ``attention_mask``, ``position_ids``, ...), the LM head not applied: the
    ``base_model`` the causal LM wraps, called with ``use_cache=False``, as TRL's fused LM head does."""
    model = _unwrapped(model)
    backbone = getattr(model, "base_model", None)
    if backbone is None or backbone is model:
        raise ValueError(f"model must be a Hugging Face causal LM with a backbone, got {type(model).__name__}")
    return backbone(*args, use_cache=False, **inputs).last_hidden_state
