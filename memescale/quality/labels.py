"""Pairwise quality labels: one SQLite table, JSONL import/export.

A label says how the left image compares with the right one on one channel (meme, aesthetic,
useful), on a five-step scale stored as a grade in -2..2 (positive: left is better)::

    {"left": 123, "right": 456, "channel": "meme", "label": "left_better",
     "rater": "anna", "source": "active", "created": 1764000000.0}

`left`/`right` are `image_id`s of the embedding shards. One rater's latest label for a pair
and channel replaces the earlier one (primary key left, right, channel, rater). SQLite in WAL
mode, so the labelling server and an exporter can use one file at once.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

CHANNELS = ("meme", "aesthetic", "useful")
GRADES = {"left_much_better": 2, "left_better": 1, "equal": 0, "right_better": -1,
          "right_much_better": -2}
GRADE_NAMES = {v: k for k, v in GRADES.items()}

SCHEMA = """
CREATE TABLE IF NOT EXISTS labels (
    left INTEGER NOT NULL, right INTEGER NOT NULL, channel TEXT NOT NULL,
    grade INTEGER NOT NULL CHECK (grade BETWEEN -2 AND 2),
    rater TEXT NOT NULL DEFAULT '', source TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    PRIMARY KEY (left, right, channel, rater)
);
"""


class LabelError(ValueError):
    """A label record that cannot be stored: unknown channel or label, bad ids; names the line."""


@dataclass(frozen=True)
class Label:
    left: int
    right: int
    channel: str
    grade: int  # -2..2, positive: left better
    rater: str = ""
    source: str = ""
    created: float = 0.0

    def to_json(self) -> dict:
        d = asdict(self)
        d["label"] = GRADE_NAMES[d.pop("grade")]
        return d

    @classmethod
    def from_json(cls, d: dict) -> Label:
        """Parse one JSONL record; raises LabelError naming what is wrong."""
        if not isinstance(d, dict):
            raise LabelError("not a JSON object")
        if d.get("channel") not in CHANNELS:
            raise LabelError(f"channel must be one of {CHANNELS}, got {d.get('channel')!r}")
        if d.get("label") not in GRADES:
            raise LabelError(f"label must be one of {tuple(GRADES)}, got {d.get('label')!r}")
        try:
            left, right = int(d["left"]), int(d["right"])
        except (KeyError, TypeError, ValueError) as e:
            raise LabelError(f"left/right must be integer image ids: {e}") from e
        if left == right:
            raise LabelError("left and right are the same image")
        return cls(left, right, d["channel"], GRADES[d["label"]], str(d.get("rater", "")),
                   str(d.get("source", "")), float(d.get("created", 0.0) or time.time()))


class LabelStore:
    """The labels of one SQLite file. Thread-safe for one writer (a lock-free connection per
    call); every method is O(rows touched)."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30.0)

    def add(self, labels: Iterable[Label]) -> int:
        """Store labels (replacing a rater's earlier label of the same pair and channel)."""
        rows = [(lb.left, lb.right, lb.channel, lb.grade, lb.rater, lb.source,
                 lb.created or time.time()) for lb in labels]
        for r in rows:
            if r[2] not in CHANNELS or r[3] not in GRADE_NAMES or r[0] == r[1]:
                raise LabelError(f"invalid label {r}")
        with self._connect() as db:
            db.executemany("INSERT OR REPLACE INTO labels VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        return len(rows)

    def labels(self) -> list[Label]:
        """Every label, oldest first."""
        with self._connect() as db:
            rows = db.execute("SELECT left, right, channel, grade, rater, source, created "
                              "FROM labels ORDER BY created, rowid").fetchall()
        return [Label(*r) for r in rows]

    def count(self) -> int:
        with self._connect() as db:
            return db.execute("SELECT COUNT(*) FROM labels").fetchone()[0]

    def import_jsonl(self, path: str | Path) -> int:
        """Add every line of a JSONL file; raises LabelError naming the first bad line."""
        return self.add(read_jsonl(path))

    def export_jsonl(self, path: str | Path) -> int:
        """Write every label as one JSON line; returns the count."""
        labels = self.labels()
        with open(path, "w") as f:
            for lb in labels:
                f.write(json.dumps(lb.to_json(), sort_keys=True) + "\n")
        return len(labels)


def read_jsonl(path: str | Path) -> Iterator[Label]:
    """Labels of a JSONL file (blank lines ignored); LabelError names the bad line."""
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield Label.from_json(json.loads(line))
            except (json.JSONDecodeError, LabelError) as e:
                raise LabelError(f"{path}:{n}: {e}") from e


def read_labels(path: str | Path) -> list[Label]:
    """Labels from a SQLite store (.sqlite/.db) or a JSONL file (.jsonl/.json)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"labels file {p} does not exist")
    if p.suffix in (".jsonl", ".json"):
        return list(read_jsonl(p))
    return LabelStore(p).labels()
