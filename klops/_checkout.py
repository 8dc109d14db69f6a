"""``klops.kernels`` and ``klops.csrc`` in a checkout: imported first by ``klops/__init__.py``.

setup.py installs the top-level ``kernels/`` folder as ``klops.kernels`` (and ``csrc/``, the C++ sources that
klops/_cpu.py builds, as ``klops.csrc``). The folder has no ``__init__.py``: it is a
namespace portion, so that from the repository root ``import kernels`` finds an installed ``kernels`` distribution
(Hugging Face's, which transformers imports) rather than the folder, which a regular package outranks. A wheel holds
the folder as ``klops/kernels/``, which the import system finds; setuptools' editable finder finds a mapped package
only by its ``__init__.py``, and a checkout on ``sys.path`` has no ``klops/kernels/``: there ``klops.kernels`` is
made here, a namespace package over the folder. The same holds for ``klops.csrc``, which holds no Python.
"""

import importlib.machinery
import importlib.util
import os
import sys

KERNELS = __package__ + ".kernels"

for _folder in ("kernels", "csrc"):
    _name = f"{__package__}.{_folder}"
    if importlib.util.find_spec(_name) is None:
        _spec = importlib.machinery.ModuleSpec(_name, None, is_package=True)
        _spec.submodule_search_locations = [os.path.join(os.path.dirname(os.path.dirname(__file__)), _folder)]
        sys.modules[_name] = importlib.util.module_from_spec(_spec)
