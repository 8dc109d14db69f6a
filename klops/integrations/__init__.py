"""klops inside other libraries' trainers: ``klops.integrations.trl.patch()`` (docs/integrations.md).

Each integration is its own module, imported on demand, so that ``import klops`` never imports the library it
patches.
"""
