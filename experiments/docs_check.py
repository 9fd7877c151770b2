"""Every results table the docs show must be what its records give (issue 24).

    python -m experiments.docs_check            # exit 1, naming each mismatch
    python -m experiments.docs_check --write    # refresh the tables included in the docs

Two checks:

1. **Each grid's ``docs/results/<grid>/table.md`` (and a robustness grid's
   ``matrix.md``) regenerates from its records.** The
   report (``experiments.report.build_report``, what ``run_grid --report-only``
   writes) is rebuilt in memory from the committed ``runs/*/summary.json`` and compared
   with the committed file, character for character. A grid whose records the report
   refuses to pair (``PairingError``: runs of mixed code versions) is allowed only if it
   is listed in ``UNPAIRED`` with the reason; a listed grid that pairs again must be
   removed from the list (the check says so), so the list cannot go stale; a listed
   grid's table.md is still checked, as the report writes it without the paired table
   (``build_report(unpaired_ok=True)``: the refusal in its place). A
   robustness grid's ``matrix.md`` (defence x attack, ``experiments.robustness_table``)
   needs no pairing and is always checked, and so is ``privacy-fmnist``'s ``curve.md``
   (``experiments.privacy_curve``). So are the attacks' tables: ``results/audit/table.md``
   (``experiments.audit.build_table``, from its ``*.json`` records) and
   ``results/membership/table.md`` (``experiments.membership.build_table``, from its
   records and their score arrays) and ``results/inversion/table.md``
   (``experiments.inversion.build_table``); and ``benchmarks/goals.md``, the performance
   goals with each one's measurements from its benchmark record (``experiments.goals``),
   and ``benchmarks/tables.md``, tables of the benchmark records
   (``experiments.benchmark_tables``).
2. **A table the docs include is the generated one, not a copy.** In README.md and
   docs/*.md a generated table sits between

       <!-- generated: results/<grid>/table.md, table <k> -->
       ...
       <!-- end generated -->

   (k: the k-th markdown table of that file, from 1; the path is relative to docs/). The
   lines between the markers must equal that table (indented as the marker is, inside a
   list item); ``--write`` replaces them with it.

Nothing in the app imports this module.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
RESULTS = DOCS / "results"

# Grids whose records the report refuses to pair until they are rerun with one code
# version (issue 24); their committed table.md predates the pairing check.
# None left: privacy-fmnist's were superseded on 2026-12-04 (docs/privacy.md).
UNPAIRED: dict[str, str] = {}

MARKER = re.compile(r"^\s*<!-- generated: (?P<path>\S+), table (?P<k>\d+) -->\s*$")
END = "<!-- end generated -->"


@dataclass
class Problem:
    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


# ------------------------------------------------------------------ 1. table.md from records
def regenerate(grid_name: str, results: Path = RESULTS, *, unpaired_ok: bool = False) -> str:
    """The table.md the report writes for this grid from its committed records (raises
    experiments.report.PairingError where it refuses to pair them, unless ``unpaired_ok``:
    then the table.md that says why in place of the paired table)."""
    from experiments.grids import GRIDS
    from experiments.report import build_report

    return build_report(GRIDS[grid_name], results / grid_name, unpaired_ok=unpaired_ok)[3]


def check_grid_tables(results: Path = RESULTS, unpaired: dict[str, str] = UNPAIRED) -> list[Problem]:
    from experiments.grids import GRIDS
    from experiments.report import PairingError

    problems = []
    for name in GRIDS:
        table = results / name / "table.md"
        if not table.exists():
            continue
        where = f"{results.name}/{name}/table.md"
        try:
            text = regenerate(name, results)
        except PairingError as error:
            if name not in unpaired:
                problems.append(Problem(where, f"the report refuses to pair its records ({error})"))
                continue
            text = regenerate(name, results, unpaired_ok=True)  # its other tables still count
        else:
            if name in unpaired:
                problems.append(Problem(where, "its records pair now: remove it from "
                                               "experiments/docs_check.py UNPAIRED"))
        if text != table.read_text():
            first = next(i for i, (a, b) in enumerate(zip(text.splitlines() + [""],
                                                           table.read_text().splitlines() + [""]))
                         if a != b)
            problems.append(Problem(where, f"differs from what its records give from line "
                                           f"{first + 1} (python -m experiments.run_grid {name} "
                                           "--report-only rewrites it)"))
    return problems


def check_matrices(results: Path = RESULTS) -> list[Problem]:
    """Each committed ``matrix.md`` equals what experiments.robustness_table builds."""
    from experiments.grids import GRIDS
    from experiments.robustness_table import build_matrix

    problems = []
    for name in GRIDS:
        matrix = results / name / "matrix.md"
        if not matrix.exists():
            continue
        if build_matrix(name, results) != matrix.read_text():
            problems.append(Problem(f"{results.name}/{name}/matrix.md",
                                    "differs from what its records give (python -m "
                                    f"experiments.robustness_table {name} rewrites it)"))
    return problems


def check_curves(results: Path = RESULTS) -> list[Problem]:
    """The committed privacy-utility ``curve.md`` equals what experiments.privacy_curve
    builds from the grid's runs (its superseded copies are not checked)."""
    from experiments.privacy_curve import build_curve

    curve = results / "privacy-fmnist" / "curve.md"
    if not curve.exists() or build_curve(curve.parent / "runs")[0] == curve.read_text():
        return []
    return [Problem(f"{results.name}/privacy-fmnist/curve.md", "differs from what its records "
                    "give (python -m experiments.privacy_curve rewrites it)")]


# the attacks' tables: results folder -> (module, what rewrites it)
ATTACK_TABLES = {
    "audit": ("experiments.audit", "python -m experiments.audit --table-only"),
    "membership": ("experiments.membership", "python -m experiments.membership --table-only"),
    "inversion": ("experiments.inversion", "python -m experiments.inversion --table-only"),
}


def check_attack_tables(results: Path = RESULTS) -> list[Problem]:
    """Each attack's committed ``table.md`` equals what its module's ``build_table``
    makes of the records beside it."""
    import importlib

    problems = []
    for folder, (module, command) in ATTACK_TABLES.items():
        table = results / folder / "table.md"
        if not table.exists():
            continue
        built = importlib.import_module(module).build_table(table.parent)
        if built != table.read_text():
            problems.append(Problem(f"{results.name}/{folder}/table.md", "differs from what "
                                    f"its records give ({command} rewrites it)"))
    return problems


def check_goals(benchmarks: Path = DOCS / "benchmarks") -> list[Problem]:
    """The committed ``benchmarks/goals.md`` and ``benchmarks/tables.md`` equal what
    experiments.goals and experiments.benchmark_tables build from the benchmark records."""
    from experiments.benchmark_tables import build_tables
    from experiments.goals import build_goals

    problems = []
    for name, build, module in (("goals.md", build_goals, "experiments.goals"),
                                ("tables.md", build_tables, "experiments.benchmark_tables")):
        where = f"{benchmarks.name}/{name}"
        try:
            built = build(benchmarks)
        except (OSError, ValueError, KeyError) as error:
            problems.append(Problem(where, f"cannot be built from its records ({error})"))
            continue
        if not (benchmarks / name).exists() or built != (benchmarks / name).read_text():
            problems.append(Problem(where, f"differs from what its records give (python -m "
                                           f"{module} rewrites it)"))
    return problems


# ------------------------------------------------------------------ 2. tables the docs include
def markdown_tables(text: str) -> list[list[str]]:
    """The markdown tables of ``text``: each a maximal run of lines starting with '|'."""
    tables, current = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    if current:
        tables.append(current)
    return tables


def _included(path: Path, docs: Path, lines: list[str] | None = None
              ) -> list[tuple[int, int, Path, int]]:
    """(marker line, end line, source file, k) of every included table in ``path``."""
    lines = path.read_text().splitlines() if lines is None else lines
    blocks, i = [], 0
    while i < len(lines):
        m = MARKER.match(lines[i])
        if m:
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == END), None)
            if end is None:
                raise ValueError(f"{path}:{i + 1}: '{lines[i]}' has no '{END}' after it")
            blocks.append((i, end, docs / m["path"], int(m["k"])))
            i = end
        i += 1
    return blocks


def _source_table(source: Path, k: int) -> list[str]:
    if not source.exists():
        raise ValueError(f"names {source}, which does not exist")
    tables = markdown_tables(source.read_text())
    if not 1 <= k <= len(tables):
        raise ValueError(f"asks for table {k} of {source.name}, which has {len(tables)}")
    return tables[k - 1]


def doc_files(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def check_included(files: list[Path], docs: Path = DOCS, write: bool = False) -> list[Problem]:
    problems = []
    for path in files:
        lines = path.read_text().splitlines()
        try:
            blocks = _included(path, docs, lines)
        except ValueError as error:
            problems.append(Problem(path.name, str(error)))
            continue
        for start, end, source, k in reversed(blocks):  # from the end: indices stay valid
            try:
                table = _source_table(source, k)
            except ValueError as error:
                problems.append(Problem(f"{path.name}:{start + 1}", str(error)))
                continue
            indent = lines[start][:len(lines[start]) - len(lines[start].lstrip())]  # in a list item
            shown = [line.removeprefix(indent) for line in lines[start + 1:end] if line.strip()]
            if shown != table:
                if write:
                    lines[start + 1:end] = [indent + line for line in table]
                else:
                    problems.append(Problem(f"{path.name}:{start + 1}",
                                            f"the table differs from table {k} of {source} "
                                            "(python -m experiments.docs_check --write)"))
        if write:
            path.write_text("\n".join(lines) + "\n")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true",
                        help="replace each included table with the generated one")
    args = parser.parse_args(argv)
    problems = (check_included(doc_files(), write=args.write) + check_grid_tables()
                + check_matrices() + check_curves() + check_attack_tables() + check_goals())
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
