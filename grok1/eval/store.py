"""Resumable per-item results: one JSON line per finished item, appended and fsynced as it finishes.

The first line is a header describing the run (task, checkpoint, data, settings). Reopening the file with
the same header continues where it stopped: items already there are skipped. A line cut short by a kill
is dropped. A different header is an error (the results would mix two runs).
"""

from __future__ import annotations

import json
import os
from pathlib import Path


class ResultStore:
    def __init__(self, path: str | Path, header: dict) -> None:
        self.path = Path(path)
        self.header = json.loads(json.dumps(header))  # as it will read back
        self.records: dict[str, dict] = {}  # item id (as text) -> record
        if self.path.exists() and self.path.stat().st_size:
            self._read()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._write_lines([{"header": self.header}], "w")

    def _read(self) -> None:
        good = 0  # bytes of complete lines
        with open(self.path, "rb") as f:
            lines = f.read().split(b"\n")
        for i, raw in enumerate(lines[:-1]):  # the piece after the last newline is incomplete (or empty)
            row = json.loads(raw)
            if i == 0:
                if row.get("header") != self.header:
                    raise ValueError(f"{self.path} holds results of a different run ({_diff(row.get('header'), self.header)});"
                                     " delete it or choose another --out to start afresh")
            else:
                self.records[str(row["id"])] = row
            good += len(raw) + 1
        if good < self.path.stat().st_size:  # drop a torn last line
            with open(self.path, "r+b") as f:
                f.truncate(good)

    def _write_lines(self, rows: list[dict], mode: str) -> None:
        with open(self.path, mode, encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())

    def done(self, item_id: object) -> bool:
        return str(item_id) in self.records

    def add(self, record: dict) -> None:
        """Append one item's record (it must have an "id")."""
        self._write_lines([record], "a")
        self.records[str(record["id"])] = json.loads(json.dumps(record))


def _diff(old: dict | None, new: dict) -> str:
    if not isinstance(old, dict):
        return "no header"
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in keys[:3])
