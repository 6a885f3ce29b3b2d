"""Structured logs: JSON lines on whatever stderr is current."""

import io
import json
import logging
import sys

from memescale.logs import JsonFormatter, setup_logging


def test_json_lines_follow_stderr_after_it_is_swapped(monkeypatch):
    root = logging.getLogger()
    monkeypatch.setattr(root, "level", root.level)  # restored after
    monkeypatch.setattr(root, "handlers", [h for h in root.handlers if not isinstance(h.formatter, JsonFormatter)])
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    setup_logging()
    setup_logging()  # idempotent: one handler
    assert sum(isinstance(h.formatter, JsonFormatter) for h in root.handlers) == 1
    logging.getLogger("memescale.t").warning("one", extra={"rows": 3})
    assert json.loads(first.getvalue()) | {"ts": 0} == {"ts": 0, "level": "WARNING", "logger": "memescale.t",
                                                       "msg": "one", "rows": 3}
    first.close()  # e.g. a test runner's capture, closed after the job's main returned
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    logging.getLogger("memescale.t").warning("two")
    assert json.loads(second.getvalue())["msg"] == "two"
