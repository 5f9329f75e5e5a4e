"""Grade a student's copy of the exercise with the graded tests of this repository.

    python -m staff.grade [DIR] [--csv PATH | --no-csv] [--overwrite] [--timeout SECONDS] [--task TASK_ID ...]

run from the repository root (``python staff/grade.py`` works from anywhere). DIR (default: the current folder)
is the student's project. Its files are copied to a temporary folder, its tests/ there is replaced by this
repository's tests/ (the student's own, possibly edited, tests do not count), and pytest runs the graded
tests, those marked ``@pytest.mark.task(TASK_ID)``, with the grading plugin of tests/grading/plugin.py
recording every result as a JSON line. The grade is a table, one row per task of TASKS
(staff/handout.py): tests passed / total and the first failure's reason; it is printed and written as CSV
(--csv PATH; default grade.csv in the current folder, which is never overwritten without --overwrite).

Isolation: one pytest process runs every graded test (a module that fails to import costs only the tests in
it). No pytest process may run longer than --timeout seconds; when the first one is killed or crashes, every
task it did not finish is graded again in a process of its own that collects only that task's test files, so
an endless loop or a crash costs the task it happens in. The expected tests (the totals) come from collecting
this repository's own tests, done at the same time as the student's run.

Exit status: 0 if every graded test passed, 1 if some failed, 2 if grading could not start.
Only the standard library is used (and pytest in the subprocesses), and the code runs on Python 3.8.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, NamedTuple, Optional, Sequence, Set, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):          # run as a file, python staff/grade.py: the package staff is in REPO
    sys.path.insert(0, REPO)

from staff.handout import TASKS  # noqa: E402 (needs REPO on sys.path when run as a file)

DEFAULT_TIMEOUT = 60
DEFAULT_CSV = "grade.csv"
# Not copied into the grading folder: version control, environments, caches, data and results.
COPY_IGNORE = (".git", ".venv*", "venv", "__pycache__", ".pytest_cache", "data", "runs", "scratch", ".cache",
               ".devdata", "log_*", "*.pth", "*.pyc", "grade.csv")
# The student's own pytest set-up is not used: a top-level conftest.py would be loaded with the grader's tests
# (the grader runs with a pytest.ini of its own, so no other configuration file is read).
DROPPED_CONFIG = ("conftest.py", "pytest.ini")
PYTEST_OK = (0, 1, 5)   # all passed, some failed, nothing collected: the run finished on its own
_TASK_MARK = re.compile(r"""mark\.task\(\s*["']([A-Za-z0-9-]+)["']""")   # the task ids must be literal strings


class Outcome(NamedTuple):
    """One graded test's result: 'passed', 'failed' or 'skipped' (which does not pass), and why."""
    outcome: str
    reason: str


class Run(NamedTuple):
    """What a pytest run recorded (see tests/grading/plugin.py) and how it ended."""
    collected: Dict[str, Tuple[str, ...]]   # node id -> the tasks it grades, in collection order
    results: Dict[str, Outcome]        # node id -> result
    collect_errors: Dict[str, str]     # test file -> reason it could not be imported
    last_started: Optional[str]        # the test that was running when the run ended
    returncode: Optional[int]          # None: killed at the time limit
    timeout: float

    @property
    def finished(self) -> bool:
        return self.returncode in PYTEST_OK


class TaskGrade(NamedTuple):
    """A task's row of the grade: tests passed / total, the first failure's reason and every failure."""
    task: str
    passed: int
    total: int
    first_failure: str
    failures: List[tuple]              # (node id, reason)


# --------------------------------------------------------------------------------------------------------------
# Running pytest
# --------------------------------------------------------------------------------------------------------------

def pytest_command(args: Sequence[str], record: str, ini: Optional[str] = None) -> List[str]:
    """The pytest command line with the grading plugin's JSON record and no cache."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--grade-json", record]
    if ini is not None:
        command += ["-c", ini, "--rootdir", os.path.dirname(ini)]
    return command + list(args)


def run_with_timeout(command: Sequence[str], cwd: str, timeout: float, log_path: str) -> Optional[int]:
    """Run a command with its output in ``log_path``; returns its exit status, or None if the time ran out.

    The command runs in a session of its own, so that at the time limit it is killed with every process
    it started.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS", "PYTEST_PLUGINS", "PYTHONPATH")}
    env.update(PYTHONDONTWRITEBYTECODE="1", PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    with open(log_path, "ab") as log:
        process = subprocess.Popen(list(command), cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=(os.name == "posix"))
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(process)
            return None


def _kill_tree(process: subprocess.Popen) -> None:
    try:
        if os.name == "posix":
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.kill()
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def read_record(path: str, returncode: Optional[int], timeout: float) -> Run:
    """Parse the plugin's JSON-lines record of one run."""
    collected: Dict[str, str] = {}
    results: Dict[str, Outcome] = {}
    errors: Dict[str, str] = {}
    last_started = None
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    event = json.loads(line)
                except ValueError:          # a line cut short by a kill
                    continue
                kind = event.get("event")
                if kind == "collected" and event["tasks"]:
                    collected[event["nodeid"]] = tuple(event["tasks"])
                elif kind == "collect_error":
                    errors[event["path"]] = event["reason"]
                elif kind == "start":
                    last_started = event["nodeid"]
                elif kind == "result":
                    results[event["nodeid"]] = Outcome(event["outcome"], event["reason"])
    return Run(collected, results, errors, last_started, returncode, timeout)


def run_graded_tests(workspace: str, args: Sequence[str], timeout: float, name: str) -> Run:
    """Run pytest on graded tests in the prepared workspace (``args``: selection and test paths).

    The record and pytest's output go next to the workspace, as <name>.jsonl and <name>.log.
    """
    record = os.path.join(os.path.dirname(workspace), f"{name}.jsonl")
    log = os.path.join(os.path.dirname(workspace), f"{name}.log")
    command = pytest_command(["--continue-on-collection-errors", "-m", "task"] + list(args), record,
                             ini=os.path.join(workspace, "pytest.ini"))
    returncode = run_with_timeout(command, workspace, timeout, log)
    return read_record(record, returncode, timeout)


def graded_test_files(repo: str) -> List[str]:
    """The test files of ``repo`` ('tests/test_*.py') that mark a test with a task: the only ones collected.

    Leaving out the others saves importing their modules, and a hang or crash there costs nothing.
    """
    folder = os.path.join(repo, "tests")
    found = []
    for name in sorted(os.listdir(folder)):
        if name.startswith("test_") and name.endswith(".py"):
            with open(os.path.join(folder, name), encoding="utf-8") as handle:
                if "mark.task(" in handle.read():
                    found.append(f"tests/{name}")
    return found


def collect_inventory(repo: str = REPO, timeout: float = DEFAULT_TIMEOUT) -> Dict[str, Tuple[str, ...]]:
    """Node id -> tasks of every graded test of ``repo``'s own tests, by collecting them (nothing runs).

    Modules of ``repo`` that fail to import are left out (``expected_tests`` then falls back on the markers
    it reads in the test file).
    """
    files = graded_test_files(repo)
    if not files:
        return {}
    with tempfile.TemporaryDirectory(prefix="grade-inventory-") as scratch:
        record = os.path.join(scratch, "inventory.jsonl")
        command = pytest_command(["--collect-only", "--continue-on-collection-errors", "-m", "task",
                                  "--rootdir", repo] + files, record)
        returncode = run_with_timeout(command, repo, timeout, os.path.join(scratch, "inventory.log"))
        return dict(read_record(record, returncode, timeout).collected)


# --------------------------------------------------------------------------------------------------------------
# The grading folder
# --------------------------------------------------------------------------------------------------------------

def prepare_workspace(student_dir: str, workspace: str, grader_repo: str = REPO) -> None:
    """Copy the student's project to ``workspace`` with the grader's tests/ and pytest.ini (or an empty one)."""
    if not os.path.isdir(student_dir):
        raise FileNotFoundError(f"{student_dir} is not a folder")
    shutil.copytree(student_dir, workspace, ignore=shutil.ignore_patterns(*COPY_IGNORE), symlinks=True)
    for name in DROPPED_CONFIG:
        path = os.path.join(workspace, name)
        if os.path.isfile(path):
            os.remove(path)
    shutil.rmtree(os.path.join(workspace, "tests"), ignore_errors=True)
    shutil.copytree(os.path.join(grader_repo, "tests"), os.path.join(workspace, "tests"),
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "mutants"))
    grader_ini = os.path.join(grader_repo, "pytest.ini")
    if os.path.isfile(grader_ini):
        shutil.copy(grader_ini, os.path.join(workspace, "pytest.ini"))
    else:
        with open(os.path.join(workspace, "pytest.ini"), "w", encoding="utf-8") as handle:
            handle.write("[pytest]\n")


def tasks_in_test_file(path: str) -> Set[str]:
    """The task ids a test file's ``mark.task("...")`` markers name, read from its text (nothing imported)."""
    try:
        with open(path, encoding="utf-8") as handle:
            return set(_TASK_MARK.findall(handle.read()))
    except OSError:
        return set()


def file_of(nodeid: str) -> str:
    """The test file of a node id: 'tests/test_unet.py::test_x[1]' -> 'tests/test_unet.py'."""
    return nodeid.split("::")[0]


# --------------------------------------------------------------------------------------------------------------
# Grading
# --------------------------------------------------------------------------------------------------------------

def grade(student_dir: str, grader_repo: str = REPO, timeout: float = DEFAULT_TIMEOUT,
          tasks: Optional[Sequence[str]] = None, inventory: Optional[Dict[str, Tuple[str, ...]]] = None,
          keep: Optional[str] = None) -> List[TaskGrade]:
    """Grade ``student_dir`` with the graded tests of ``grader_repo``: one TaskGrade per task of TASKS.

    ``tasks`` limits the grade to those tasks; ``inventory`` (node id -> tasks, from ``collect_inventory``)
    saves collecting the grader's tests again when one grades many folders; ``keep`` names a new folder to
    keep the grading folder, records and pytest logs in.
    """
    selected = list(tasks) if tasks else list(TASKS)
    if keep is not None and os.path.exists(keep) and os.listdir(keep):
        raise FileExistsError(f"{keep} exists and is not empty; --keep needs a new folder")
    scratch = keep or tempfile.mkdtemp(prefix="grade-")
    os.makedirs(scratch, exist_ok=True)
    try:
        workspace = os.path.join(scratch, "work")
        prepare_workspace(student_dir, workspace, grader_repo)
        selection = [arg for task in (tasks or []) for arg in ("--task", task)]
        files = graded_test_files(workspace)
        with ThreadPoolExecutor(max_workers=2) as pool:
            pending_inventory = None if inventory is not None else pool.submit(collect_inventory, grader_repo,
                                                                                 timeout)
            if files:
                first = run_graded_tests(workspace, selection + files, timeout, "all")
            else:
                first = Run({}, {}, {}, None, 0, timeout)      # no graded tests at all: nothing to run
            if pending_inventory is not None:
                inventory = pending_inventory.result()
        expected = expected_tests(inventory, first, workspace, selected)
        runs = {task: first for task in selected}
        if not first.finished and sum(1 for nodeids in expected.values() if nodeids) > 1:
            runs.update(rerun_each_task(workspace, unfinished_tasks(expected, first), expected, timeout))
        return [grade_task(task, expected[task], runs[task]) for task in selected]
    finally:
        if keep is None:
            shutil.rmtree(scratch, ignore_errors=True)


def rerun_each_task(workspace: str, tasks: Sequence[str], expected: Dict[str, List[str]],
                    timeout: float) -> Dict[str, Run]:
    """Run each task's tests in a pytest process of its own that collects only the task's test files.

    The processes run side by side, as many as there are CPUs.
    """
    def run_task(task: str) -> Run:
        files = sorted({file_of(nodeid) for nodeid in expected[task]})
        return run_graded_tests(workspace, ["--task", task] + files, timeout, f"task-{task}")
    if not tasks:
        return {}
    with ThreadPoolExecutor(max_workers=min(len(tasks), os.cpu_count() or 1)) as pool:
        return dict(zip(tasks, pool.map(run_task, tasks)))


def expected_tests(inventory: Dict[str, Tuple[str, ...]], run: Run, workspace: str,
                   selected: Sequence[str]) -> Dict[str, List[str]]:
    """Task -> node ids it is graded on: the grader's own tests, plus any the student's run collected.

    A test file that failed to import in the student's run and is missing from the inventory counts as one
    test, '<file>::(import)', of every task its markers name.
    """
    expected: Dict[str, List[str]] = {task: [] for task in selected}
    for nodeid, tasks in list(inventory.items()) + list(run.collected.items()):
        for task in tasks:
            if task in expected and nodeid not in expected[task]:
                expected[task].append(nodeid)
    known_files = {file_of(nodeid) for nodeid in inventory}
    for path in run.collect_errors:
        if path in known_files:
            continue
        for task in tasks_in_test_file(os.path.join(workspace, path)):
            if task in expected:
                expected[task].append(f"{path}::(import)")
    return expected


def unfinished_tasks(expected: Dict[str, List[str]], run: Run) -> List[str]:
    """Tasks of which a test has no result and no import error explains it (the run was killed or crashed)."""
    return [task for task, nodeids in expected.items()
            if any(nodeid not in run.results and file_of(nodeid) not in run.collect_errors
                   for nodeid in nodeids)]


def grade_task(task: str, nodeids: List[str], run: Run) -> TaskGrade:
    """Count a task's passed tests in a run; a test without a result fails with the reason the run gives."""
    failures = []
    for nodeid in nodeids:
        result = run.results.get(nodeid)
        if result is None:
            failures.append((nodeid, missing_reason(nodeid, run)))
        elif result.outcome != "passed":
            failures.append((nodeid, result.reason or result.outcome))
    passed = len(nodeids) - len(failures)
    return TaskGrade(task, passed, len(nodeids), failures[0][1] if failures else "", failures)


def missing_reason(nodeid: str, run: Run) -> str:
    """Why a test of a run has no result: its module did not import, the time ran out, or pytest stopped."""
    error = run.collect_errors.get(file_of(nodeid))
    if error is not None:
        return f"{file_of(nodeid)} could not be imported: {error}"
    if run.returncode is None:
        if nodeid == run.last_started:
            return f"timeout: the test did not finish within the {run.timeout:g} s limit of its pytest run"
        during = f"while {run.last_started} ran" if run.last_started else "while collecting the tests"
        return f"timeout: not run, the pytest run reached its {run.timeout:g} s limit {during}"
    if nodeid == run.last_started:
        return f"crashed: pytest stopped with exit status {run.returncode} during this test"
    return f"not run: pytest stopped with exit status {run.returncode}"


# --------------------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------------------

def grade_rows(grades: Sequence[TaskGrade]) -> List[List[str]]:
    """The table's rows: task, passed, total, first failure."""
    rows = []
    for g in grades:
        reason = g.first_failure if g.total else "no graded tests yet"
        rows.append([g.task, str(g.passed), str(g.total), reason])
    return rows


def format_table(grades: Sequence[TaskGrade]) -> str:
    """The grade as a text table, with a total line."""
    rows = grade_rows(grades)
    width = max([len("task")] + [len(row[0]) for row in rows])
    lines = [f"{'task':<{width}}  {'passed':>7}  first failure", f"{'-' * width}  {'-' * 7}  {'-' * 40}"]
    for task, passed, total, reason in rows:
        lines.append(f"{task:<{width}}  {passed + '/' + total:>7}  {reason}".rstrip())
    passed = sum(g.passed for g in grades)
    total = sum(g.total for g in grades)
    lines.append(f"{'total':<{width}}  {f'{passed}/{total}':>7}")
    return "\n".join(lines)


def write_csv(grades: Sequence[TaskGrade], path: str) -> None:
    """The same table as CSV: task, passed, total, first_failure."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["task", "passed", "total", "first_failure"])
        writer.writerows(grade_rows(grades))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Grade a student's project with the graded tests of this repository: per task, tests "
                    "passed / total and the first failure's reason, printed and written as CSV.")
    parser.add_argument("directory", nargs="?", default=".", metavar="DIR",
                        help="the student's project (default: the current folder)")
    parser.add_argument("--csv", metavar="PATH", default=None,
                        help=f"write the table here (default: {DEFAULT_CSV} in the current folder, which is not "
                             f"overwritten without --overwrite)")
    parser.add_argument("--no-csv", action="store_true", help="only print the table")
    parser.add_argument("--overwrite", action="store_true", help=f"allow overwriting an existing {DEFAULT_CSV}")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help=f"time limit of each pytest process, the first (all tasks) and each task's "
                             f"rerun (default: {DEFAULT_TIMEOUT})")
    parser.add_argument("--task", action="append", metavar="TASK_ID",
                        help="grade only this task (repeatable)")
    parser.add_argument("--keep", metavar="DIR", help="keep the grading folder, records and pytest logs in DIR")
    parser.add_argument("-v", "--verbose", action="store_true", help="also list every failed test")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    unknown = [task for task in args.task or [] if task not in TASKS]
    if unknown:
        parser.error(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    if not os.path.isdir(args.directory):
        parser.error(f"{args.directory} is not a folder")
    csv_path = None if args.no_csv else (args.csv or DEFAULT_CSV)
    if csv_path == DEFAULT_CSV and args.csv is None and os.path.exists(csv_path) and not args.overwrite:
        print(f"grade.py: error: {csv_path} exists; pass --overwrite, or --csv PATH for another file",
              file=sys.stderr)
        return 2
    try:
        grades = grade(args.directory, REPO, args.timeout, args.task, keep=args.keep)
    except FileExistsError as error:
        print(f"grade.py: error: {error}", file=sys.stderr)
        return 2
    print(f"Grade of {os.path.abspath(args.directory)} (tests of {REPO}):\n")
    print(format_table(grades))
    if args.verbose:
        for g in grades:
            for nodeid, reason in g.failures:
                print(f"FAILED {nodeid}: {reason}")
    if csv_path is not None:
        write_csv(grades, csv_path)
        print(f"\nwrote {csv_path}")
    return 0 if all(g.passed == g.total for g in grades) else 1


if __name__ == "__main__":
    sys.exit(main())
