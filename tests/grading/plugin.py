"""The pytest side of grading: the ``task`` marker, ``--task`` selection and a JSON-lines record of the results.

tests/conftest.py hands pytest's ``pytest_addoption`` and ``pytest_configure`` to ``add_options`` and
``configure`` below. A test that grades a student task carries the task's id (a key of TASKS in handout.py):

    @pytest.mark.task("sheet1-unet")
    def test_...

Options:
    --task TASK_ID    run only the tests of that task (repeatable); ``-m task`` runs every graded test and
                      ``-m "not task"`` every ungraded one.
    --grade-json PATH append one JSON object per line to PATH, written as the run goes so that a run killed
                      by a time limit still leaves what it finished (grade.py reads it):
                      {"event": "collected", "nodeid": ..., "tasks": [...]}   once per selected test
                      {"event": "collect_error", "path": ..., "reason": ...}  a test module that failed to import
                      {"event": "start", "nodeid": ...}                       a test began
                      {"event": "result", "nodeid": ..., "outcome": "passed" | "failed" | "skipped",
                       "reason": ...}                                         a test ended (reason: "" if passed)
"""
from __future__ import annotations

import json
import os
import re
from typing import Dict, List, Optional

import pytest

MARKER = "task"
MAX_REASON_CHARS = 300
_FILE_LINE = re.compile(r'File "(?P<path>[^"]+)", line (?P<line>\d+)')


def add_options(parser) -> None:
    """Register ``--task`` and ``--grade-json``."""
    group = parser.getgroup("grading", "grading of the student tasks (see grade.py)")
    group.addoption("--task", action="append", default=[], metavar="TASK_ID",
                    help="run only the tests marked @pytest.mark.task(TASK_ID); repeat for several tasks")
    group.addoption("--grade-json", metavar="PATH", default=None,
                    help="append a JSON line per selected test, collection error and result to PATH (grade.py)")


def configure(config) -> None:
    """Register the ``task`` marker, and the recorder/selector when one of the options asks for it."""
    config.addinivalue_line("markers", "task(task_id): the test grades the student task task_id "
                                       "(a key of TASKS in handout.py)")
    selected = config.getoption("--task")
    record_path = config.getoption("--grade-json")
    if selected or record_path:
        config.pluginmanager.register(GradingPlugin(selected, record_path), "grading-plugin")


def tasks_of(item) -> List[str]:
    """The task ids of a collected test, from its ``task`` markers (class and module marks included)."""
    return [marker.args[0] for marker in item.iter_markers(name=MARKER) if marker.args]


def one_line_reason(report) -> str:
    """A failed or skipped report's reason on one line, e.g. 'NotImplementedError: sheet1-unet: ConvBlock.forward'.

    For an exception it is the exception's first line; for a failed collection (say, a syntax error in the
    student's module) the last 'E ' line of pytest's text, which names the error, with the file and line of a
    syntax error: 'SyntaxError: invalid syntax (networks/Conditional_UNet.py, line 47)'.
    """
    longrepr = report.longrepr
    if report.skipped and isinstance(longrepr, tuple) and len(longrepr) == 3:
        return _shorten("skipped: " + str(longrepr[2]))
    crash = getattr(longrepr, "reprcrash", None)
    if crash is not None and crash.message:
        return _shorten(_first_line(crash.message))
    text = str(longrepr)
    error_lines = [line[1:].strip() for line in text.splitlines() if line.startswith("E ")]
    if error_lines:
        places = [_FILE_LINE.search(line) for line in error_lines]
        places = [place for place in places if place is not None]
        where = ""
        if places:
            path = os.path.relpath(places[-1].group("path"))
            where = f" ({path if not path.startswith('..') else places[-1].group('path')}, " \
                    f"line {places[-1].group('line')})"
        return _shorten(error_lines[-1] + where)
    return _shorten(_first_line(text) or "failed")


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else ""


def _shorten(text: str) -> str:
    return text if len(text) <= MAX_REASON_CHARS else text[:MAX_REASON_CHARS - 3] + "..."


class GradingPlugin:
    """Keeps the tests of the ``--task`` tasks and writes the ``--grade-json`` record."""

    def __init__(self, selected_tasks: List[str], record_path: Optional[str]):
        self.selected_tasks = set(selected_tasks)
        self.record = open(record_path, "a", encoding="utf-8") if record_path else None
        self.outcomes: Dict[str, str] = {}
        self.reasons: Dict[str, str] = {}

    def _write(self, **event) -> None:
        if self.record is not None:
            self.record.write(json.dumps(event) + "\n")
            self.record.flush()

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config, items) -> None:
        if not self.selected_tasks:
            return
        kept = [item for item in items if self.selected_tasks.intersection(tasks_of(item))]
        dropped = [item for item in items if not self.selected_tasks.intersection(tasks_of(item))]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
        items[:] = kept

    def pytest_collection_finish(self, session) -> None:
        for item in session.items:
            self._write(event="collected", nodeid=item.nodeid, tasks=tasks_of(item))

    def pytest_collectreport(self, report) -> None:
        if report.failed:
            self._write(event="collect_error", path=report.nodeid, reason=one_line_reason(report))

    def pytest_runtest_logstart(self, nodeid, location) -> None:
        self._write(event="start", nodeid=nodeid)

    def pytest_runtest_logreport(self, report) -> None:
        """Fold setup, call and teardown into one outcome per test: the first failure or skip decides."""
        nodeid = report.nodeid
        if self.outcomes.get(nodeid, "passed") == "passed" and not report.passed:
            self.outcomes[nodeid] = "failed" if report.failed else "skipped"
            self.reasons[nodeid] = one_line_reason(report)
        else:
            self.outcomes.setdefault(nodeid, "passed")
        if report.when == "teardown":
            self._write(event="result", nodeid=nodeid, outcome=self.outcomes[nodeid],
                        reason=self.reasons.get(nodeid, ""))

    def pytest_unconfigure(self, config) -> None:
        if self.record is not None:
            self.record.close()
            self.record = None
