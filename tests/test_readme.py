"""The README's code runs as written: every ```python block, and every call of the paper / trainer table.

The Tour sets its sizes in one line, ``B, L, V, D = ...``; the test replaces that line with tiny sizes (and fails
if it is missing or repeated, so that it never runs on nothing), runs each block on this machine's device, then
evaluates each ``klops.`` call of the table in the Tour's namespace and checks that it returns a finite loss.
"""

import ast
import math
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"
SIZES_LINE = re.compile(r"^B, L, V, D = .*$", re.MULTILINE)
TINY_SIZES = "B, L, V, D = 4, 16, 256, 32"  # B even (chosen / rejected pairs); V above the Tour's top-50
TABLE_HEADING = "## Which call for which paper or trainer"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)


def table_calls(text: str) -> list[tuple[str, str]]:
    """(paper, call) for each row of the table: its first cell and the code span of its second."""
    assert TABLE_HEADING in text, f"README.md has no section {TABLE_HEADING!r}"
    section = text.split(TABLE_HEADING, 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")][2:]  # after the header and |---|
    calls = []
    for line in rows:
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]  # a `\|` inside a cell stays
        assert len(cells) == 3 and re.fullmatch(r"`klops\.[^`]+`", cells[1]), f"table row without one call: {line}"
        calls.append((cells[0], cells[1].strip("`")))
    return calls


def first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, tuple | list) and value:
        return first_tensor(value[0])
    return getattr(value, "cost", None)  # a SinkhornResult


@pytest.fixture(scope="module")
def readme() -> str:
    return README.read_text()


@pytest.fixture(scope="module")
def tour(readme) -> dict:
    """The namespace left by the block that sets the sizes, run at ``TINY_SIZES``."""
    assert len(SIZES_LINE.findall(readme)) == 1, f"README.md must set the Tour's sizes in one line {SIZES_LINE.pattern}"
    (block,) = [b for b in python_blocks(readme) if SIZES_LINE.search(b)]
    namespace = {"__name__": "readme_tour"}
    torch.manual_seed(0)
    exec(compile(SIZES_LINE.sub(TINY_SIZES, block), "README.md (Tour)", "exec"), namespace)
    return namespace


def test_tour_runs(tour):
    assert (tour["B"], tour["L"], tour["V"], tour["D"]) == (4, 16, 256, 32)  # the substitution took
    assert tour["student"].grad is not None and torch.isfinite(tour["student"].grad.float()).all()
    assert torch.isfinite(tour["loss"]).all()


def test_other_python_blocks_run(readme):
    for i, block in enumerate(python_blocks(readme)):
        if not SIZES_LINE.search(block):
            exec(compile(block, f"README.md (python block {i})", "exec"), {"__name__": "readme_block"})


def test_paper_table_calls_run(readme, tour):
    calls = table_calls(readme)
    assert len(calls) >= 30, f"found only {len(calls)} calls in the README's table under {TABLE_HEADING!r}"
    for row, call in calls:
        tree = ast.parse(call, mode="eval")  # a SyntaxError names the call
        assert isinstance(tree.body, ast.Call | ast.Attribute), f"{row}: {call} is not a call"
        value = eval(compile(tree, f"README.md table: {row}", "eval"), dict(tour))
        loss = first_tensor(value)
        assert isinstance(loss, torch.Tensor), f"{row}: {call} returned {type(value).__name__}"
        assert all(math.isfinite(v) for v in loss.detach().float().flatten().tolist()), f"{row}: {call} -> {loss}"
