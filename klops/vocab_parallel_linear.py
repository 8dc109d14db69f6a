"""Vocabulary-parallel forms of fused_linear_logprobs and fused_linear_kl (heads sharded over the vocabulary) (issue 33), on the plumbing of
klops/vocab_parallel.py."""
