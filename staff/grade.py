"""Grade students' projects by the sheets: each task on its own, judged outside the student's process, in points.

    python -m staff.grade SUBMISSION [--csv PATH | --no-csv] [--overwrite] [--task TASK_ID ...] [-v]
    python -m staff.grade --class SUBMISSIONS_DIR --out REPORTS_DIR [--workers N]
    (either: --no-sandbox, for code you trust only)

SUBMISSION is a project folder or a .zip of one (the project may sit in one folder inside). --class grades every
folder and .zip file in SUBMISSIONS_DIR side by side and writes REPORTS_DIR/class.csv (one row per submission: the
points of each task, the total and the first failure) and REPORTS_DIR/<submission>/report.txt and report.csv.
Common options: --timeout SECONDS (per task, default 60), --memory-gb GB (address space of a grading process,
default 8), --workers N (processes running students' code at once, default: the CPUs), --keep DIR (keep the
grading folder).

How a task is graded (staff/graded/): the task's checks (verdicts.py) each make inputs, a probe (probes.py) runs the
student's code on them in a separate process (runner.py) and returns arrays, and the verdict compares those arrays
with the sheets' mathematics here, in the grading process, where no student code runs. The code a task runs is
  tier 1: the student's project with the reference's code in the regions of every *other* task (handout.py's
          fill), so that a mistake, a syntax error, an exception, a crash or an endless loop in one task costs only
          that task; and when a check fails there,
  tier 2: the student's project as handed in (a task that builds on the student's own names elsewhere);
the better of the two counts. A task's points are its points (staff/points.csv) times the share of the weight of
its checks that passed. The student's tests/, conftest.py and pytest set-up are never used, and the submission is
copied and never written. Every task's process runs in a bubblewrap sandbox (staff/graded/sandbox.py): it sees the
system, the Python and its own workspace only, writes only there and in a private /tmp, has no network, and leaves
no process behind. Without bubblewrap (or unprivileged user namespaces) grading is refused unless --no-sandbox.

Exit status: 0 every task full, 1 some points lost, 2 grading could not start. Standard library plus numpy and
torch (requirements.txt); Python 3.8.
"""
from __future__ import annotations

import argparse
import csv
import fnmatch
import hashlib
import io
import json
import math
import os
import queue
import re
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):          # run as a file, python staff/grade.py: the package staff is in REPO
    sys.path.insert(0, REPO)

from staff import handout  # noqa: E402
from staff.graded import sandbox  # noqa: E402
from staff.handout import TASKS  # noqa: E402

DEFAULT_TIMEOUT = 60
DEFAULT_MEMORY_GB = 8
DEFAULT_CSV = "grade.csv"
POINTS_FILE = os.path.join(REPO, "staff", "points.csv")
# Not copied into a grading workspace: version control, environments, caches, data, results and the student's
# pytest set-up (the grader runs no test file of the submission).
COPY_IGNORE = (".git", ".venv*", "venv", "__pycache__", ".pytest_cache", "data", "runs", "scratch", ".cache",
               ".devdata", "log_*", "*.pth", "*.pt", "*.pyc", "*.png", "*.gif", "grade.csv", "conftest.py",
               "pytest.ini", "tests", "__MACOSX")
MAX_ZIP_BYTES = 200 * 1024 * 1024
MAX_OUTPUT_BYTES = 64 * 1024 * 1024


class CheckResult(NamedTuple):
    check: str
    passed: bool
    reason: str
    weight: float


class TaskGrade(NamedTuple):
    """A task's row: points earned of its points, checks passed of checks, the first failure's reason."""
    task: str
    points: float
    max_points: float
    passed: int
    total: int
    first_failure: str
    results: List[CheckResult]


class SubmissionGrade(NamedTuple):
    name: str
    tasks: List[TaskGrade]
    error: str = ""

    @property
    def total(self) -> float:
        return round(sum(t.points for t in self.tasks), 2)

    @property
    def max_total(self) -> float:
        return round(sum(t.max_points for t in self.tasks), 2)

    @property
    def first_failure(self) -> str:
        if self.error:
            return self.error
        for task in self.tasks:
            if task.first_failure:
                return f"{task.task}: {task.first_failure}"
        return ""


def read_points(path: str = POINTS_FILE) -> Dict[str, float]:
    """Task id -> points, from staff/points.csv (the one table staff edit)."""
    with open(path, newline="", encoding="utf-8") as handle:
        points = {row["task"]: float(row["points"]) for row in csv.DictReader(handle)}
    unknown = set(points) - set(TASKS)
    missing = set(TASKS) - set(points)
    if unknown or missing:
        raise ValueError(f"{path}: tasks unknown {sorted(unknown)}, missing {sorted(missing)}")
    return points


def task_points(points: float, results: Sequence[CheckResult]) -> float:
    """points x (weight of the checks passed / weight of all checks), rounded to 0.01."""
    total = sum(r.weight for r in results)
    earned = sum(r.weight for r in results if r.passed)
    return round(points * earned / total, 2) if total else 0.0


# --------------------------------------------------------------------------------------------------------------
# Submissions: unpacking and the workspaces of the tasks
# --------------------------------------------------------------------------------------------------------------

def find_project_root(folder: str) -> str:
    """The folder holding the project: ``folder`` or the one folder inside it that holds ddpm.py or networks/."""
    def is_project(path):
        return os.path.isfile(os.path.join(path, "ddpm.py")) or os.path.isdir(os.path.join(path, "networks"))
    if is_project(folder):
        return folder
    for current, dirs, _files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in ("__MACOSX", ".git"))
        if is_project(current):
            return current
    return folder


def ignored_in(source: str):
    """copytree's ignore for a submission folder: COPY_IGNORE, and every symbolic link except one to a file inside
    the submission (copied as that file). A link pointing outside (the grader would copy a file of this machine
    for the student's code to read), to a folder, or to nothing is left out, as if it were not there."""
    root = os.path.realpath(source)
    patterns = shutil.ignore_patterns(*COPY_IGNORE)

    def ignore(folder, names):
        left_out = set(patterns(folder, names))
        for name in names:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                target = os.path.realpath(path)
                if not os.path.isfile(target) or not target.startswith(root + os.sep):
                    left_out.add(name)
        return left_out
    return ignore


def unpack(source: str, target: str) -> str:
    """Copy a submission folder, or extract a .zip safely (no paths outside, limited size), into ``target``."""
    if os.path.isdir(source):
        shutil.copytree(source, target, ignore=ignored_in(source), symlinks=False)
        return find_project_root(target)
    if not zipfile.is_zipfile(source):
        raise ValueError(f"{source} is neither a folder nor a zip file")
    os.makedirs(target)
    with zipfile.ZipFile(source) as archive:
        size = 0
        for info in archive.infolist():
            name = info.filename.replace("\\", "/")
            parts = [p for p in name.split("/") if p not in ("", ".")]
            if info.is_dir() or not parts or ".." in parts or name.startswith("/"):
                continue
            if any(fnmatch.fnmatch(part, pattern) for part in parts for pattern in COPY_IGNORE):
                continue
            size += info.file_size
            if size > MAX_ZIP_BYTES:
                raise ValueError(f"{source} unpacks to more than {MAX_ZIP_BYTES // 2 ** 20} MiB of code")
            destination = os.path.join(target, *parts)
            os.makedirs(os.path.dirname(destination), exist_ok=True)
            with archive.open(info) as member, open(destination, "wb") as out:
                shutil.copyfileobj(member, out)
    return find_project_root(target)


def lenient_regions(text: str) -> List[handout.Region]:
    """The well-formed regions of a student's file; broken or missing markers just leave a region out."""
    lines = text.splitlines(keepends=True)
    found, open_begin = [], None
    for index, line in enumerate(lines):
        begin = handout._BEGIN_RE.match(line.rstrip("\r\n"))
        end = handout._END_RE.match(line.rstrip("\r\n"))
        if begin is not None:
            open_begin = (index, begin)
        elif end is not None and open_begin is not None:
            start, match = open_begin
            if match.group("indent") == end.group("indent"):
                found.append(handout.Region(match.group("task"), match.group("what"), match.group("indent"),
                                            start, index))
            open_begin = None
    return found


class Reference:
    """The reference's files with regions, their regions, and the checks of every task."""

    def __init__(self, repo: str = REPO):
        self.repo = repo
        self.files = {path: handout.read_text(os.path.join(repo, path))
                      for path in handout.regions_of_repository(repo)}
        self.regions = {path: handout.find_regions(text.splitlines(keepends=True), path)
                        for path, text in self.files.items()}

    def tasks_in(self, path: str) -> set:
        return {r.task for r in self.regions.get(path, [])}

    def filled(self, student_text: str, path: str, keep_task: Optional[str]) -> Tuple[str, List[str]]:
        """The student's file with the reference's code in every region of a task other than ``keep_task``
        (``None``: all of the student's own); returns the text and the regions whose markers are missing."""
        lines = student_text.splitlines(keepends=True)
        reference_lines = self.files[path].splitlines(keepends=True)
        student = {(r.task, r.what): r for r in lenient_regions(student_text)}
        missing = [f"{path}: {r.task} {r.what}" for r in self.regions[path] if (r.task, r.what) not in student]
        if keep_task is None:
            return student_text, missing
        replacements = []
        for region in self.regions[path]:
            mine = student.get((region.task, region.what))
            if mine is not None and region.task != keep_task:
                replacements.append((mine, reference_lines[region.begin + 1:region.end]))
        for mine, body in sorted(replacements, key=lambda pair: -pair[0].begin):
            lines[mine.begin + 1:mine.end] = body
        return "".join(lines), missing


def edited_away(reference: Reference, project: str) -> Dict[str, List[str]]:
    """Task -> the regions of that task whose markers the student's project lacks (or whose file is missing)."""
    missing: Dict[str, List[str]] = {}
    for path in reference.files:
        location = os.path.join(project, path)
        if not os.path.isfile(location):
            for region in reference.regions[path]:
                missing.setdefault(region.task, []).append(f"{path} is missing")
            continue
        _, lost = reference.filled(handout.read_text(location), path, None)
        for entry in lost:
            task = entry.split(": ", 1)[1].split(" ", 1)[0]
            missing.setdefault(task, []).append(entry)
    return missing


def remove_tree(path: str) -> None:
    """Delete a file or folder a job may have left, also folders it made unreadable; never follows a link."""
    def allow(function, failed, _error):
        try:
            os.chmod(os.path.dirname(failed), 0o700)
            if os.path.isdir(failed) and not os.path.islink(failed):
                os.chmod(failed, 0o700)
            function(failed)
        except OSError:
            pass
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, onerror=allow)
    elif os.path.lexists(path):
        os.unlink(path)


def make_workspace(reference: Reference, project: str, target: str, keep_task: Optional[str]) -> str:
    """A copy of the student's project, with the reference's regions of every task but ``keep_task`` (tier 1)
    or exactly as handed in (``keep_task`` None, tier 2). Returns a hash of its files."""
    shutil.copytree(project, target, ignore=shutil.ignore_patterns(*COPY_IGNORE), symlinks=False)
    if keep_task is not None:
        for path in reference.files:
            location = os.path.join(target, path)
            if os.path.isfile(location):
                try:
                    text = handout.read_text(location)
                except (UnicodeDecodeError, OSError):
                    continue
                handout.write_text(location, reference.filled(text, path, keep_task)[0])
    digest = hashlib.sha256()
    for folder, dirs, files in os.walk(target):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, target).encode() + b"\0")
            with open(path, "rb") as handle:
                digest.update(hashlib.sha256(handle.read()).digest())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------------------
# The runners (staff/graded/runner.py) and the jobs
# --------------------------------------------------------------------------------------------------------------

def read_job_file(folder_fd: int, name: str, limit: int, whole: bool = True) -> Optional[bytes]:
    """A regular file a job wrote into its io folder, or None: no such file, one over ``limit`` bytes (``whole``;
    else its first ``limit`` bytes), or anything else (a link, a pipe) in its place, which would make the grader
    read elsewhere or wait."""
    try:
        handle = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=folder_fd)
    except OSError:
        return None
    try:
        status = os.fstat(handle)
        if not stat.S_ISREG(status.st_mode) or (whole and status.st_size > limit):
            return None
        with os.fdopen(os.dup(handle), "rb") as stream:
            return stream.read(limit)
    finally:
        os.close(handle)


class SandboxError(RuntimeError):
    """The sandbox cannot run on this machine (the message says why, how to fix it, and --no-sandbox)."""


class Runner:
    """One runner process: imports the libraries once and forks a process per job.

    Sandboxed (the default), the runner lives in a bubblewrap sandbox (staff/graded/sandbox.py) whose only
    writable folder of this machine is its slot: for each job the grader moves the task's workspace and io folder
    into the slot and, when the runner has answered (every process of the job ended), out again. The sandbox
    ends with the thread that started it (--die-with-parent), so runners are started by ``starter``, a thread
    that lives as long as the grader.
    """

    def __init__(self, scratch: str, memory_bytes: int, sandboxed: bool = True,
                 starter: Optional[ThreadPoolExecutor] = None):
        self.scratch, self.memory_bytes, self.sandboxed, self.starter = scratch, memory_bytes, sandboxed, starter
        self.slot = os.path.join(scratch, "slot")
        self.process = None
        self.start()

    def start(self) -> None:
        home, tmp = os.path.join(self.scratch, "home"), os.path.join(self.scratch, "tmp")
        command = [sys.executable, os.path.join(REPO, "staff", "graded", "runner.py"), "--memory-bytes",
                   str(self.memory_bytes)]
        if self.sandboxed:
            os.makedirs(self.slot, exist_ok=True)
            home, tmp = sandbox.HOME, "/tmp"
            command = sandbox.arguments(self.slot) + ["--"] + command + ["--sandboxed"]
        else:
            os.makedirs(home, exist_ok=True)
            os.makedirs(tmp, exist_ok=True)
        env = {key: value for key, value in os.environ.items()
               if key in ("PATH", "LANG", "LC_ALL", "SYSTEMROOT", "VIRTUAL_ENV")}
        env.update(HOME=home, TMPDIR=tmp, PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   OMP_WAIT_POLICY="PASSIVE", MPLBACKEND="Agg", MPLCONFIGDIR=os.path.join(home, "mpl"),
                   TORCH_HOME=os.path.join(home, "torch"), PYTHONHASHSEED="0")
        def popen():
            with open(os.path.join(self.scratch, "runner.log"), "ab") as log:
                return subprocess.Popen(command, cwd=self.scratch if self.sandboxed else tmp, env=env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                        universal_newlines=True, bufsize=1)
        self.process = self.starter.submit(popen).result() if self.starter else popen()

    def run(self, job: dict) -> dict:
        """Run a job on its workspace and io folder (moved into the slot and back when sandboxed)."""
        if not self.sandboxed:
            return self.send(job)
        workspace, io_dir = job["workspace"], job["io"]
        self.empty_slot()
        os.rename(workspace, os.path.join(self.slot, "workspace"))
        os.rename(io_dir, os.path.join(self.slot, "io"))
        try:
            return self.send(dict(job, workspace=f"{sandbox.SLOT}/workspace", io=f"{sandbox.SLOT}/io"))
        finally:
            for name, back in (("workspace", workspace), ("io", io_dir)):
                try:
                    os.rename(os.path.join(self.slot, name), back)   # whatever the job left there (never followed)
                except OSError:
                    pass
            self.empty_slot()

    def empty_slot(self) -> None:
        for entry in os.listdir(self.slot):
            remove_tree(os.path.join(self.slot, entry))

    def send(self, job: dict) -> dict:
        """Send a job and wait for its answer; a runner that died is restarted (the job counts as crashed)."""
        try:
            self.process.stdin.write(json.dumps(job) + "\n")
            self.process.stdin.flush()
            answer = self.process.stdout.readline()
        except (BrokenPipeError, OSError):
            answer = ""
        if not answer:
            self.close()
            self.start()
            return {"id": job["id"], "status": "died", "detail": "the grading process running it ended"}
        return json.loads(answer)

    def close(self) -> None:
        if self.process is not None:
            try:
                self.process.stdin.close()
            except OSError:
                pass
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None


class Grader:
    """Grades submissions with a pool of runners; identical workspaces of one grading share their results."""

    def __init__(self, scratch: str, workers: Optional[int] = None, timeout: float = DEFAULT_TIMEOUT,
                 memory_gb: float = DEFAULT_MEMORY_GB, seed: Optional[int] = None, repo: str = REPO,
                 reuse: bool = True, sandboxed: bool = True, clean_up: bool = False):
        from staff.graded import verdicts
        if sandboxed and sandbox.problem():
            raise SandboxError(sandbox.refusal(sandbox.problem()))
        self.verdicts = verdicts
        self.scratch, self.timeout, self.reuse, self.sandboxed = scratch, timeout, reuse, sandboxed
        self.clean_up = clean_up           # delete a submission's workspaces once it is graded (unless --keep)
        os.makedirs(scratch, exist_ok=True)
        self.reference = Reference(repo)
        self.points = read_points()
        self.seed = secrets.randbelow(2 ** 31) if seed is None else seed
        self.inputs = {}
        import numpy as np
        for index, item in enumerate(verdicts.CHECKS):
            self.inputs[item.name] = item.inputs(np.random.default_rng([self.seed, index]))
        self.workers = max(1, workers or os.cpu_count() or 1)
        self.memory_bytes = int(memory_gb * 2 ** 30)
        self.runners: "queue.Queue[Runner]" = queue.Queue()
        self._runner_lock = threading.Lock()
        self._starter = ThreadPoolExecutor(max_workers=1)      # starts the runners: a thread as long-lived as this
        self._started = 0
        self._results: Dict[str, list] = {}
        self._pending: Dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._counter = 0

    def _runner(self) -> Runner:
        with self._runner_lock:
            if self._started < self.workers and self.runners.empty():
                self._started += 1
                folder = os.path.join(self.scratch, f"runner{self._started}")
                os.makedirs(folder, exist_ok=True)
                return Runner(folder, self.memory_bytes, self.sandboxed, self._starter)
        return self.runners.get()

    def close(self) -> None:
        while not self.runners.empty():
            self.runners.get().close()
        self._starter.shutdown()

    def run_task(self, workspace: str, digest: str, task: str) -> List[CheckResult]:
        """Run a task's checks on a workspace and judge them (or reuse the results of an identical workspace)."""
        if not self.reuse:
            return self._run_task(workspace, task)
        key = f"{task}:{digest}"
        with self._lock:
            if key in self._results:
                return self._results[key]
            waiting = self._pending.get(key)
            if waiting is None:
                self._pending[key] = threading.Event()
        if waiting is not None:
            waiting.wait()
            return self._results.get(key) or self._run_task(workspace, task)
        results: List[CheckResult] = []
        try:
            results = self._run_task(workspace, task)
        finally:
            with self._lock:
                if results:
                    self._results[key] = results
                self._pending.pop(key).set()
        return results

    def _run_task(self, workspace: str, task: str) -> List[CheckResult]:
        import numpy as np
        checks = self.verdicts.checks_of(task)
        with self._lock:
            self._counter += 1
            job_id = self._counter
        io_dir = os.path.join(os.path.dirname(workspace), f"io-{os.path.basename(workspace)}")
        os.makedirs(io_dir)
        for item in checks:
            np.savez(os.path.join(io_dir, f"{item.name}.in.npz"), **self.inputs[item.name])
        io_fd = os.open(io_dir, os.O_RDONLY | os.O_DIRECTORY)   # the folder itself, wherever a job moves it
        try:
            runner = self._runner()
            try:
                answer = runner.run({"id": job_id, "workspace": workspace, "io": io_dir, "timeout": self.timeout,
                                     "probes": [[item.name, item.probe] for item in checks]})
            finally:
                self.runners.put(runner)
            return [self.judge(item, io_fd, answer) for item in checks]
        finally:
            os.close(io_fd)

    def judge(self, item, io_fd: int, answer: dict) -> CheckResult:
        """The verdict on one check, from the arrays its probe wrote (never from what the job says of itself)."""
        import numpy as np
        written = read_job_file(io_fd, f"{item.name}.out.npz", MAX_OUTPUT_BYTES)
        error_text = read_job_file(io_fd, f"{item.name}.err", 400, whole=False)
        if written is not None:
            try:
                with np.load(io.BytesIO(written), allow_pickle=False) as loaded:
                    outputs = {key: loaded[key] for key in loaded.files}
                item.verify(self.inputs[item.name], outputs)
                return CheckResult(item.name, True, "", item.weight)
            except self.verdicts.Failed as failure:
                return CheckResult(item.name, False, str(failure)[:400], item.weight)
            except Exception as error:                     # noqa: BLE001 (malformed arrays from the student's run)
                return CheckResult(item.name, False, f"unusable result ({type(error).__name__}: {error})"[:400],
                                   item.weight)
        if error_text is not None:
            return CheckResult(item.name, False, error_text.decode("utf-8", "replace").strip() or "failed",
                               item.weight)
        if answer.get("status") == "timeout":
            return CheckResult(item.name, False, f"timeout: the task {answer.get('detail')}", item.weight)
        if answer.get("status") == "died":
            return CheckResult(item.name, False, f"crashed: the task's process {answer.get('detail')}", item.weight)
        return CheckResult(item.name, False, "no result: the task's process ended before this check finished",
                           item.weight)

    def grade(self, source: str, name: Optional[str] = None, tasks: Optional[Sequence[str]] = None) -> SubmissionGrade:
        """Grade one submission (folder or zip) on ``tasks`` (default: all), its tasks in parallel."""
        name = name or os.path.basename(os.path.normpath(source))
        folder = tempfile.mkdtemp(prefix="submission-", dir=self.scratch)
        selected = list(tasks) if tasks else list(TASKS)
        try:
            project = unpack(source, os.path.join(folder, "submitted"))
        except (ValueError, OSError, zipfile.BadZipFile) as error:
            empty = [TaskGrade(t, 0.0, self.points[t], 0, len(self.verdicts.checks_of(t)),
                               f"could not be read: {error}", []) for t in selected]
            return SubmissionGrade(name, empty, f"could not be read: {error}")
        missing = edited_away(self.reference, project)
        as_handed_in = {}

        def tier2_digest():
            with self._lock:
                if "digest" not in as_handed_in:
                    as_handed_in["path"] = os.path.join(folder, "as-handed-in")
                    as_handed_in["digest"] = make_workspace(self.reference, project, as_handed_in["path"], None)
            return as_handed_in["path"], as_handed_in["digest"]

        def grade_task(task: str) -> TaskGrade:
            points = self.points[task]
            workspace = os.path.join(folder, f"tier1-{task}")
            digest = make_workspace(self.reference, project, workspace, task)
            results = self.run_task(workspace, digest, task)
            if not all(r.passed for r in results):
                path, digest2 = tier2_digest()
                if digest2 != digest:
                    copy = os.path.join(folder, f"tier2-{task}")
                    shutil.copytree(path, copy)
                    second = self.run_task(copy, digest2, task)
                    if task_points(points, second) > task_points(points, results):
                        results = second
            failures = [r for r in results if not r.passed]
            reason = failures[0].reason if failures else ""
            if task in missing:
                note = "markers edited away: " + "; ".join(missing[task])
                reason = f"{note}; {reason}" if reason else note
            return TaskGrade(task, task_points(points, results), points, len(results) - len(failures), len(results),
                             reason, results)

        try:
            with ThreadPoolExecutor(max_workers=self.workers) as pool:
                graded = list(pool.map(grade_task, selected))
        finally:
            if self.clean_up:
                remove_tree(folder)
        return SubmissionGrade(name, graded)


# --------------------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------------------

def format_points(value: float) -> str:
    return f"{value:g}"


def format_table(grade: SubmissionGrade, verbose: bool = False) -> str:
    width = max(len("task"), *(len(t.task) for t in grade.tasks))
    lines = [f"{'task':<{width}}  {'points':>9}  {'checks':>6}  first failure",
             f"{'-' * width}  {'-' * 9}  {'-' * 6}  {'-' * 40}"]
    for t in grade.tasks:
        score = f"{format_points(t.points)}/{format_points(t.max_points)}"
        lines.append(f"{t.task:<{width}}  {score:>9}  {f'{t.passed}/{t.total}':>6}  {t.first_failure}".rstrip())
        if verbose:
            lines += [f"{'':<{width}}    FAILED {r.check}: {r.reason}" for r in t.results if not r.passed]
    lines.append(f"{'total':<{width}}  {format_points(grade.total) + '/' + format_points(grade.max_total):>9}")
    return "\n".join(lines)


TASK_CSV_FIELDS = ["task", "points", "max_points", "checks_passed", "checks", "first_failure"]


def write_task_csv(grade: SubmissionGrade, path: str) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(TASK_CSV_FIELDS)
        for t in grade.tasks:
            writer.writerow([t.task, format_points(t.points), format_points(t.max_points), t.passed, t.total,
                             t.first_failure])
        writer.writerow(["total", format_points(grade.total), format_points(grade.max_total), "", "", ""])


def write_class_csv(grades: Sequence[SubmissionGrade], tasks: Sequence[str], path: str) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["submission"] + list(tasks) + ["total", "max", "first_failure"])
        for g in grades:
            by_task = {t.task: t for t in g.tasks}
            writer.writerow([g.name] + [format_points(by_task[t].points) if t in by_task else "" for t in tasks]
                            + [format_points(g.total), format_points(g.max_total), g.first_failure])


def write_report(grade: SubmissionGrade, folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "report.txt"), "w", encoding="utf-8") as handle:
        handle.write(f"Grade of {grade.name}\n\n{format_table(grade, verbose=True)}\n")
    write_task_csv(grade, os.path.join(folder, "report.csv"))


def submissions_in(folder: str) -> List[Tuple[str, str]]:
    """(name, path) of every folder and .zip file in ``folder``, sorted by name."""
    found = []
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        if entry.startswith("."):
            continue
        if os.path.isdir(path):
            found.append((entry, path))
        elif entry.lower().endswith(".zip"):
            found.append((entry[:-4], path))
    return found


def grade_class(submissions_dir: str, out: str, workers: Optional[int] = None, timeout: float = DEFAULT_TIMEOUT,
                memory_gb: float = DEFAULT_MEMORY_GB, keep: Optional[str] = None, reuse: bool = True,
                tasks: Optional[Sequence[str]] = None, log=None, sandboxed: bool = True) -> List[SubmissionGrade]:
    """Grade every submission of a folder; writes OUT/class.csv and OUT/<name>/report.{txt,csv}."""
    if not os.path.isdir(submissions_dir):
        raise FileNotFoundError(f"{submissions_dir} is not a folder")
    found = submissions_in(submissions_dir)
    if not found:
        raise FileNotFoundError(f"{submissions_dir} holds no submission (folders or .zip files)")
    if sandboxed and sandbox.problem():
        raise SandboxError(sandbox.refusal(sandbox.problem()))
    scratch = keep or tempfile.mkdtemp(prefix="grade-class-")
    os.makedirs(scratch, exist_ok=True)
    grader = Grader(scratch, workers, timeout, memory_gb, reuse=reuse, sandboxed=sandboxed, clean_up=keep is None)
    os.makedirs(out, exist_ok=True)
    try:
        with ThreadPoolExecutor(max_workers=max(1, min(len(found), grader.workers))) as pool:
            futures = [(name, pool.submit(grader.grade, path, name, tasks)) for name, path in found]
            grades = []
            for name, future in futures:
                grade = future.result()
                write_report(grade, os.path.join(out, name))
                grades.append(grade)
                if log is not None:
                    log(f"{name}: {format_points(grade.total)}/{format_points(grade.max_total)}")
    finally:
        grader.close()
        if keep is None:
            shutil.rmtree(scratch, ignore_errors=True)
    write_class_csv(grades, list(tasks) if tasks else list(TASKS), os.path.join(out, "class.csv"))
    return grades


def grade_one(source: str, tasks: Optional[Sequence[str]] = None, timeout: float = DEFAULT_TIMEOUT,
              memory_gb: float = DEFAULT_MEMORY_GB, workers: Optional[int] = None,
              keep: Optional[str] = None, sandboxed: bool = True) -> SubmissionGrade:
    if sandboxed and sandbox.problem():
        raise SandboxError(sandbox.refusal(sandbox.problem()))
    scratch = keep or tempfile.mkdtemp(prefix="grade-")
    os.makedirs(scratch, exist_ok=True)
    grader = Grader(scratch, workers, timeout, memory_gb, sandboxed=sandboxed, clean_up=keep is None)
    try:
        return grader.grade(source, tasks=tasks)
    finally:
        grader.close()
        if keep is None:
            shutil.rmtree(scratch, ignore_errors=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Grade a student's project (a folder or a .zip) by the sheets, task by task, in points; or a "
                    "whole class with --class.")
    parser.add_argument("submission", nargs="?", metavar="SUBMISSION", help="a project folder or .zip file")
    parser.add_argument("--class", dest="class_dir", metavar="SUBMISSIONS_DIR",
                        help="grade every folder and .zip file in this folder (with --out)")
    parser.add_argument("--out", metavar="REPORTS_DIR", help="with --class: where class.csv and the reports go")
    parser.add_argument("--csv", metavar="PATH", help=f"one submission: write its table here (default "
                                                      f"{DEFAULT_CSV}, never overwritten without --overwrite)")
    parser.add_argument("--no-csv", action="store_true", help="one submission: only print the table")
    parser.add_argument("--overwrite", action="store_true", help=f"allow overwriting an existing {DEFAULT_CSV}")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help=f"time limit of one task's process (default {DEFAULT_TIMEOUT})")
    parser.add_argument("--memory-gb", type=float, default=DEFAULT_MEMORY_GB, metavar="GB",
                        help=f"address-space limit of one task's process (default {DEFAULT_MEMORY_GB})")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="processes running students' code at once (default: the CPUs)")
    parser.add_argument("--task", action="append", metavar="TASK_ID", help="grade only this task (repeatable)")
    parser.add_argument("--keep", metavar="DIR", help="keep the grading folder (workspaces, inputs, outputs) in DIR")
    parser.add_argument("--no-reuse", action="store_true",
                        help="judge every workspace, also one identical to another of this run (default: identical "
                             "workspaces, e.g. copies of the same files, share their results)")
    parser.add_argument("--no-sandbox", action="store_true",
                        help="run the students' code without the sandbox (bubblewrap), with every right of this "
                             "user: only for code you trust")
    parser.add_argument("-v", "--verbose", action="store_true", help="list every failed check")
    return parser


NO_SANDBOX_WARNING = ("grade.py: warning: --no-sandbox: the students' code runs with every right of this user (it "
                      "can read, change and delete this user's files and reach the network); grade untrusted code "
                      "in the sandbox")


def refuse(message: str) -> int:
    print(f"grade.py: error: {message}", file=sys.stderr)
    return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    unknown = [task for task in args.task or [] if task not in TASKS]
    if unknown:
        parser.error(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    if os.name != "posix":
        print("grade.py: error: grading needs a POSIX system (fork, sessions, resource limits)", file=sys.stderr)
        return 2
    if args.keep and os.path.exists(args.keep) and os.listdir(args.keep):
        return refuse(f"{args.keep} exists and is not empty; --keep needs a new folder")
    if args.class_dir and not args.out:
        parser.error("--class needs --out REPORTS_DIR")
    if not args.class_dir and not args.submission:
        parser.error("give SUBMISSION, or --class SUBMISSIONS_DIR --out REPORTS_DIR")
    if args.class_dir:
        if not os.path.isdir(args.class_dir):
            return refuse(f"{args.class_dir} is not a folder (--class needs the folder of the submissions)")
        if not submissions_in(args.class_dir):
            return refuse(f"{args.class_dir} holds no submission (folders or .zip files)")
    elif not os.path.exists(args.submission):
        return refuse(f"{args.submission} does not exist")
    elif not os.path.isdir(args.submission) and not zipfile.is_zipfile(args.submission):
        return refuse(f"{args.submission} is neither a folder nor a zip file")
    if args.no_sandbox:
        print(NO_SANDBOX_WARNING, file=sys.stderr)
    elif sandbox.problem():
        print(sandbox.refusal(sandbox.problem()), file=sys.stderr)
        return 2
    sandboxed = not args.no_sandbox
    if args.class_dir:
        start = time.monotonic()
        grades = grade_class(args.class_dir, args.out, args.workers, args.timeout, args.memory_gb, args.keep,
                             reuse=not args.no_reuse, tasks=args.task, log=print, sandboxed=sandboxed)
        print(f"graded {len(grades)} submissions in {time.monotonic() - start:.0f} s; wrote "
              f"{os.path.join(args.out, 'class.csv')}")
        return 0 if all(g.total == g.max_total for g in grades) else 1
    csv_path = None if args.no_csv else (args.csv or DEFAULT_CSV)
    if csv_path == DEFAULT_CSV and args.csv is None and os.path.exists(csv_path) and not args.overwrite:
        return refuse(f"{csv_path} exists; pass --overwrite, or --csv PATH for another file")
    grade = grade_one(args.submission, args.task, args.timeout, args.memory_gb, args.workers, args.keep, sandboxed)
    print(f"Grade of {os.path.abspath(args.submission)} (checks of {REPO}):\n")
    print(format_table(grade, args.verbose))
    if csv_path is not None:
        write_task_csv(grade, csv_path)
        print(f"\nwrote {csv_path}")
    return 0 if grade.total == grade.max_total else 1


if __name__ == "__main__":
    sys.exit(main())
