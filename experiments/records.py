"""Benchmark records: JSON lines appended to, and read from, files under docs/benchmarks/."""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable


def append_record(out: Path, label: str, cores: int | None, fields: dict[str, Any],
                  shown: Callable[[str], bool] = lambda key: True) -> dict[str, Any]:
    """Append ``{when, label, machine, cores, **fields, load_average}`` to ``out`` (JSON
    Lines), print the keys ``shown`` keeps, and return the row."""
    row = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "label": label,
           "machine": platform.node(), "cores": cores, **fields,
           "load_average": os.getloadavg()}
    print(json.dumps({k: v for k, v in row.items() if shown(k)}, indent=1))
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as handle:
        handle.write(json.dumps(row) + "\n")
    return row


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every row of the JSON-lines file ``path``, in the order appended (blank lines skipped)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
