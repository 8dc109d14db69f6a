"""Vocabulary-parallel forms of divergence_and_label_logprobs, forward_reverse_kl / akl_loss, dckd_loss and TopK teachers (issue 33), on the plumbing of
klops/vocab_parallel.py."""
