"""Vocabulary-parallel forms of sequence_logprobs, the GRPO family and tdpo_loss (issue 33), on the plumbing of
klops/vocab_parallel.py."""
