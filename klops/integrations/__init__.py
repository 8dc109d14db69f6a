"""klops inside other libraries: ``klops.integrations.trl.patch()`` runs TRL 1.16's trainers on klops's ops
(docs/integrations.md); ``klops.integrations.hf`` reads what the fused-linear ops need from a Hugging Face causal LM.

Each integration is its own module, imported on demand, so that ``import klops`` never imports the library it
serves.
"""
