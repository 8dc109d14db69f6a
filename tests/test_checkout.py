"""The top-level ``kernels/`` folder is ``klops.kernels`` and never shadows an installed ``kernels`` (klops/_checkout).

transformers imports Hugging Face's ``kernels`` package; from the repository root (pytest's rootdir, ``python -c``)
the folder comes first on ``sys.path``. Without ``__init__.py`` it is a namespace portion, which any regular package
of that name outranks, wherever it lies on ``sys.path``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import klops

ROOT = Path(__file__).resolve().parents[1]


def find_from_root(code: str, pythonpath: str | None = None) -> dict:
    """Run ``code`` (which prints JSON) with the repository root as working directory and first on sys.path."""
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


FIND_KERNELS = "import importlib.util, json; s = importlib.util.find_spec('kernels'); print(json.dumps(s.origin))"


def test_kernels_folder_is_a_namespace_portion():
    assert not (ROOT / "kernels" / "__init__.py").exists()
    origin = find_from_root(FIND_KERNELS)
    # The folder as a namespace (origin None), or a regular package installed elsewhere (Hugging Face's).
    assert origin is None or ROOT not in Path(origin).resolve().parents, origin


def test_an_installed_kernels_package_wins_from_the_root(tmp_path):
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    origin = find_from_root(FIND_KERNELS, pythonpath=str(tmp_path))
    assert origin == str(tmp_path / "kernels" / "__init__.py")


def test_klops_kernels_imports_from_the_root(tmp_path):
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    code = "import json, kernels, klops.kernels.launch as m; print(json.dumps([kernels.__file__, m.__file__]))"
    other, launch = find_from_root(code, pythonpath=str(tmp_path))
    assert other == str(tmp_path / "kernels" / "__init__.py")
    installed = Path(klops.__file__).parent / "kernels" / "launch.py"
    assert Path(launch) in (ROOT / "kernels" / "launch.py", installed), launch
