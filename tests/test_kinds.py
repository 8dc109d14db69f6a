"""The table of divergence kinds (kernels/kinds.py) against what lists kinds elsewhere: docs/losses.md's §1 tables, the
CUDA enum and the Triton ids, and the float64 reference where the teacher is 0 (TopK tail="renormalize")."""

import math
import re
from pathlib import Path

import pytest
import torch

from klops.divergence import DIVERGENCE_KINDS, KINDS
from klops.kernels.kinds import infinite_where_p_is_0
from klops.reference import divergence_reference

ROOT = Path(__file__).resolve().parents[1]


def section(anchor: str) -> str:
    """docs/losses.md's text under the heading whose GitHub anchor is ``anchor``, up to the next heading."""
    text = (ROOT / "docs" / "losses.md").read_text()
    for match in re.finditer(r"^(#+) (.*)$", text, re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", match.group(2).lower()).replace(" ", "-")
        if "#" + slug == anchor:
            rest = text[match.end() :]
            following = re.search(r"^#+ ", rest, re.MULTILINE)
            return rest[: following.start() if following else None]
    raise AssertionError(f"no heading of docs/losses.md has the anchor {anchor}")


def kind_tables(text: str) -> list[list[list[str]]]:
    """The Markdown tables of ``text`` whose first header cell is "kind", as rows of cells (header dropped)."""
    tables, rows = [], None
    for line in text.splitlines() + [""]:
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")] if line.startswith("|") else None
        if cells and cells[0] == "kind":
            rows = []
        elif cells is None and rows is not None:
            tables.append(rows)
            rows = None
        elif rows is not None and not set(cells[0]) <= set("-:"):
            rows.append(cells)
    return tables


def coefficient_words(kind) -> str:
    """The coefficient column of docs/losses.md's first §1 table, from the kinds table."""
    if kind.coefficient is None:
        return "none"
    low, high = kind.range
    if math.isinf(low) and math.isinf(high):
        excluded = " or ".join(f"{c:g}" for c, _ in kind.excluded)
        return f"`{kind.coefficient}` real" + (f", not {excluded}" if excluded else "")
    return f"`{kind.coefficient}` in `[{low:g}, {high:g}]`"


def test_docs_tables_list_the_kinds():
    by_anchor = {}
    for kind in KINDS:
        by_anchor.setdefault(kind.anchor, []).append(kind)
    for anchor, kinds in by_anchor.items():
        tables = kind_tables(section(anchor))
        assert len(tables) >= 3, f"docs/losses.md{anchor}: the kind, generator and a_v tables"
        for rows in tables:
            names = [re.match(r"`(\w+)`", row[0]).group(1) for row in rows]
            assert names == [kind.name for kind in kinds], f"docs/losses.md{anchor}: {names}"
        assert [row[1] for row in tables[0]] == [coefficient_words(kind) for kind in kinds]
        defaults = {kind.default for kind in kinds if kind.coefficient}
        assert len(defaults) == 1 and f"(default {defaults.pop():g})" in section(anchor).split("\n|")[1]


def test_cuda_and_triton_ids_follow_the_table():
    enum = re.search(r"enum Kind : int \{([^}]*)\}", (ROOT / "csrc" / "divergence_terms.cuh").read_text()).group(1)
    assert [name.strip() for name in enum.split(",")] == [name.upper() for name in DIVERGENCE_KINDS] + ["kNumKinds"]
    pytest.importorskip("triton")
    from klops.kernels import divergence

    assert [getattr(divergence, name.upper()).value for name in DIVERGENCE_KINDS] == list(range(len(KINDS)))


@pytest.mark.parametrize("kind", KINDS, ids=DIVERGENCE_KINDS)
def test_infinite_where_p_is_0_as_the_reference(kind):
    """D is +inf against a teacher with a 0 entry (a renormalized TopK's tail) exactly where the table says, over
    the coefficient's range, as the float64 reference has it; elsewhere the table's terms there are finite (their
    values are test_topk's renormalize cases)."""
    student = torch.tensor([[0.3, -0.2, 1.0, 0.0]], dtype=torch.float64)
    teacher = torch.tensor([[0.5, 0.2, 0.3, 0.0]], dtype=torch.float64)
    coefficients = [None]
    if kind.coefficient is not None:
        low, high = (max(kind.range[0], -3.0), min(kind.range[1], 3.0))
        coefficients = [c for c in torch.linspace(low, high, 25).tolist() if c not in dict(kind.excluded)]
        coefficients += [kind.default, kind.example] + [c for c, _ in kind.same_as]
    for coef in coefficients:
        kw = {} if coef is None else {kind.coefficient: coef}
        value = divergence_reference(student, teacher, kind.name, target_is="probs", **kw)
        infinite = infinite_where_p_is_0(kind.name, 0.0 if coef is None else coef)
        assert bool(torch.isinf(value).all()) == infinite, (kind.name, coef, float(value))
        assert not torch.isnan(value).any()
        if not infinite and coef not in dict(kind.same_as):  # (there the other kind's terms apply)
            assert all(math.isfinite(x) for x in kind.where_p_is_0(0.0 if coef is None else coef)), (kind.name, coef)


def test_fused_kl_docstring_table_lists_the_kinds():
    import klops

    lines = klops.fused_kl.__doc__.splitlines()
    rulers = [i for i, line in enumerate(lines) if line.strip().startswith("=====")]
    indent = len(lines[rulers[0]]) - len(lines[rulers[0]].lstrip())
    width = len(lines[rulers[0]].split()[0])  # of the kind column
    cells = [line[indent : indent + width].strip() for line in lines[rulers[1] + 1 : rulers[2]]]
    assert [cell.split()[0] for cell in cells if cell] == list(DIVERGENCE_KINDS)


def test_readme_names_the_kinds():
    paragraph = (ROOT / "README.md").read_text().split("`fused_kl` kinds (", 1)[1].split("\n\n", 1)[0]
    assert [name for name in DIVERGENCE_KINDS if f"`{name}`" not in paragraph] == []
