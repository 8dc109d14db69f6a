"""Thin reference trainers on a Hugging Face causal LM, one readable module each, every loss from klops's
fused-linear ops on the model's last hidden states and LM head (the ``[B, L, V]`` logits never exist):
``sft``, ``distill``, ``grpo``, ``dpo``. Run them with ``klops train NAME --preset tiny`` (docs/trainers.md).
Importing this package imports neither transformers nor the trainers."""

TRAINERS = ("sft", "distill", "grpo", "dpo")
