"""The one CSV writer: rows of dicts, columns in first-seen order, written atomically."""
from __future__ import annotations

import csv
import io
from pathlib import Path

from .cache_dir import write_text


def write_csv(path: Path, rows: list[dict]) -> None:
    """Write `rows` to `path`; a column missing from a row is left empty (rows may differ in keys)."""
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())
