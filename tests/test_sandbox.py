"""The grader's sandbox (staff/graded/sandbox.py): submissions that try to get out, graded for real.

Each attack is the reference with one region (q_sample's) that tries one way out and then computes its answer:
writing outside by an absolute path, by '..' and through a symbolic link it ships, reading another submission
and a staff file (the content would come back in the grade's first failure), deleting a file in the home folder,
sending its loss to a port of this machine, and leaving a process behind in a session of its own. Graded without
the sandbox, each one gets out (so the attacks are real); graded in it, each one fails, costs at most its own
task, and the machine is as it was: the files, the listening port and the processes are checked. Where bubblewrap
cannot run, these tests are skipped with the reason. Not handed out to students.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import socket
import uuid

import pytest

from staff import grade
from staff.graded import sandbox

REPO = grade.REPO
PROBLEM = sandbox.problem()
needs_sandbox = pytest.mark.skipif(PROBLEM is not None, reason=f"the sandbox cannot run here: {PROBLEM}")
TASK = "sheet2-q-sample"
Q_SAMPLE = "        return extract(self.sqrt_alpha_bar_t, t) * y0 + extract(self.sqrt_one_minus_alpha_bar_t, t) * noise\n"
SECRET = "SECRET-OF-ANOTHER-STUDENT-" + uuid.uuid4().hex
STAFF_FILE = os.path.join(REPO, "staff", "graded", "verdicts.py")
TOKEN = "left-behind-" + uuid.uuid4().hex


def copy_project(target: str) -> str:
    shutil.copytree(REPO, target, ignore=shutil.ignore_patterns(*grade.COPY_IGNORE, "staff"))
    return target


def with_region(project: str, attempt: str) -> None:
    """Put ``attempt`` (lines indented for q_sample's body) before q_sample's own answer."""
    location = os.path.join(project, "ddpm.py")
    with open(location, encoding="utf-8") as handle:
        text = handle.read()
    assert text.count(Q_SAMPLE) == 1
    with open(location, "w", encoding="utf-8") as handle:
        handle.write(text.replace(Q_SAMPLE, attempt + Q_SAMPLE))


def tried(*lines: str) -> str:
    """Lines run inside try/except: a blocked attempt is silent, and the region then answers correctly."""
    body = "".join(f"            {line}\n" for line in lines)
    return f"        try:\n{body}        except Exception:\n            pass\n"


def leak_if_read(*paths_or_globs: str) -> str:
    """A region that reads the first of these files it can and, if it could, puts the text into its error."""
    return ("        import glob as _glob\n"
            "        _found = ''\n"
            f"        for _pattern in {list(paths_or_globs)!r}:\n"
            "            for _path in _glob.glob(_pattern, recursive=True):\n"
            "                try:\n"
            "                    _found = _found or open(_path).read()[:300]\n"
            "                except Exception:\n"
            "                    pass\n"
            "        if _found:\n"
            "            raise RuntimeError('read: ' + _found)\n")


def tree_digest(folder: str, skip: str) -> str:
    digest = hashlib.sha256()
    for current, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if os.path.join(current, d) != skip)
        for name in sorted(files + [d for d in dirs if os.path.islink(os.path.join(current, d))]):
            path = os.path.join(current, name)
            digest.update(os.path.relpath(path, folder).encode())
            if os.path.islink(path):
                digest.update(os.readlink(path).encode())
            else:
                with open(path, "rb") as handle:
                    digest.update(handle.read())
    return digest.hexdigest()


def left_behind() -> list:
    """Processes of this machine whose command line holds TOKEN."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    if TOKEN.encode() in handle.read():
                        found.append(int(entry))
            except OSError:
                pass
    return found


@pytest.fixture(scope="module")
def machine(tmp_path_factory):
    """A small machine: a home folder with a file, a target folder, another student's submission, a port that
    listens, and the attacks (name -> submission folder)."""
    base = str(tmp_path_factory.mktemp("machine"))
    home, target = os.path.join(base, "home"), os.path.join(base, "target")
    os.makedirs(home)
    os.makedirs(target)
    with open(os.path.join(home, "keep-me.txt"), "w") as handle:
        handle.write("the staff's own file")
    with open(os.path.join(target, "linked-file"), "w") as handle:
        handle.write("original")
    victim = copy_project(os.path.join(base, "class", "victim"))
    with open(os.path.join(victim, "secret.txt"), "w") as handle:
        handle.write(SECRET)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    scratch = os.path.join(base, "grading")
    attempts = {
        "writes-by-absolute-path": tried(f"open({os.path.join(target, 'by-absolute-path')!r}, 'w').write('x')"),
        "writes-through-dot-dot": "".join(tried(f"open({'../' * depth + 'escaped-by-dot-dot'!r}, 'w').write('x')")
                                          for depth in range(1, 9)),
        "writes-through-a-shipped-link": tried("open('link-out', 'w').write('changed by the student')",
                                               "open('folder-link/through-a-folder-link', 'w').write('x')"),
        "reads-another-submission": leak_if_read(os.path.join(victim, "secret.txt"),
                                                 os.path.join(scratch, "**", "secret.txt"),
                                                 "../../*/*/secret.txt"),
        "reads-a-staff-file": leak_if_read(STAFF_FILE, "staff-link"),
        "deletes-in-the-home-folder": tried(f"os.remove({os.path.join(home, 'keep-me.txt')!r})"),
        "sends-to-a-local-port": tried("import socket as _socket",
                                       f"_socket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'loss')"),
        "leaves-a-process-behind": tried(
            "import subprocess as _subprocess, sys as _sys",
            f"_subprocess.Popen([_sys.executable, '-c', 'import time; time.sleep(300)', {TOKEN!r}], "
            "start_new_session=True, stdin=_subprocess.DEVNULL, stdout=_subprocess.DEVNULL, "
            "stderr=_subprocess.DEVNULL)"),
    }
    attacks = {}
    for name, attempt in attempts.items():
        project = copy_project(os.path.join(base, "attacks", name))
        with_region(project, "        import os\n" + attempt)
        attacks[name] = project
    os.symlink(os.path.join(target, "linked-file"), os.path.join(attacks["writes-through-a-shipped-link"], "link-out"))
    os.symlink(target, os.path.join(attacks["writes-through-a-shipped-link"], "folder-link"))
    os.symlink(STAFF_FILE, os.path.join(attacks["reads-a-staff-file"], "staff-link"))
    saved_home = os.environ.get("HOME")
    os.environ["HOME"] = home                     # the grading user's home folder, as far as the grader knows
    try:
        yield {"base": base, "home": home, "target": target, "victim": victim, "listener": listener,
               "scratch": scratch, "attacks": attacks}
    finally:
        listener.close()
        for pid in left_behind():
            os.kill(pid, 9)
        if saved_home is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = saved_home


def pending_connection(listener: socket.socket) -> bool:
    """Whether anyone connected to the port since the last look (every waiting connection is taken)."""
    listener.settimeout(0.5)
    connected = False
    while True:
        try:
            connection, _ = listener.accept()
        except socket.timeout:
            return connected
        connection.close()
        connected = True


def grade_attacks(machine, sandboxed: bool) -> dict:
    """Grade the other student's submission, then every attack (TASK only); returns name -> TaskGrade."""
    scratch = os.path.join(machine["scratch"], "sandboxed" if sandboxed else "open")
    grader = grade.Grader(scratch, workers=2, timeout=30, sandboxed=sandboxed, reuse=False)
    try:
        grader.grade(machine["victim"], "victim", tasks=[TASK])
        return {name: grader.grade(project, name, tasks=[TASK]).tasks[0]
                for name, project in machine["attacks"].items()}
    finally:
        grader.close()


def escapes(machine, grades: dict, before: str) -> dict:
    """Name -> whether that attack got out, judged from the machine (and the grade's text for the reads)."""
    target, base = machine["target"], machine["base"]
    with open(os.path.join(target, "linked-file")) as handle:
        linked = handle.read()
    dot_dot = [os.path.join(folder, "escaped-by-dot-dot") for folder, _dirs, files in os.walk(base)
               if "escaped-by-dot-dot" in files and not os.path.basename(folder).startswith(("tier1-", "tier2-"))]
    return {
        "writes-by-absolute-path": os.path.exists(os.path.join(target, "by-absolute-path")),
        "writes-through-dot-dot": bool(dot_dot),
        "writes-through-a-shipped-link": linked != "original"
                                         or os.path.exists(os.path.join(target, "through-a-folder-link")),
        "reads-another-submission": SECRET in grades["reads-another-submission"].first_failure,
        "reads-a-staff-file": "read: " in grades["reads-a-staff-file"].first_failure,
        "deletes-in-the-home-folder": not os.path.exists(os.path.join(machine["home"], "keep-me.txt")),
        "sends-to-a-local-port": pending_connection(machine["listener"]),
        "leaves-a-process-behind": bool(left_behind()),
        "machine changed": tree_digest(base, machine["scratch"]) != before,
    }


def restore(machine) -> None:
    """Undo what the attacks did without the sandbox."""
    for pid in left_behind():
        os.kill(pid, 9)
    target = machine["target"]
    for name in os.listdir(target):
        os.remove(os.path.join(target, name))
    with open(os.path.join(target, "linked-file"), "w") as handle:
        handle.write("original")
    with open(os.path.join(machine["home"], "keep-me.txt"), "w") as handle:
        handle.write("the staff's own file")
    for folder, _dirs, files in os.walk(machine["base"]):
        if "escaped-by-dot-dot" in files:
            os.remove(os.path.join(folder, "escaped-by-dot-dot"))


@needs_sandbox
def test_every_attack_gets_out_without_the_sandbox_and_none_in_it(machine):
    before = tree_digest(machine["base"], machine["scratch"])
    open_grades = grade_attacks(machine, sandboxed=False)
    without = escapes(machine, open_grades, before)
    restore(machine)
    assert tree_digest(machine["base"], machine["scratch"]) == before
    stayed_in = [name for name, out in without.items() if not out and name != "writes-through-a-shipped-link"]
    assert not stayed_in, f"attacks that did not get out even without the sandbox: {stayed_in}"
    assert not without["writes-through-a-shipped-link"]     # the copy of a submission leaves such links out

    grades = grade_attacks(machine, sandboxed=True)
    inside = escapes(machine, grades, before)
    assert not any(inside.values()), f"got out of the sandbox: {[name for name, out in inside.items() if out]}"
    for name, task in grades.items():            # each attempt failed quietly: the task's own answer counts
        assert task.points == task.max_points, (name, task.first_failure)


@needs_sandbox
def test_a_dangling_link_in_a_submission_is_graded_as_if_it_were_not_there(tmp_path):
    project = copy_project(str(tmp_path / "with-a-dangling-link"))
    os.symlink(str(tmp_path / "no-such-file"), os.path.join(project, "dangling.py"))
    os.symlink("../no-such-folder/x", os.path.join(project, "networks", "dangling"))
    grader = grade.Grader(str(tmp_path / "scratch"), workers=2, timeout=60)
    try:
        graded = grader.grade(project, tasks=[TASK, "sheet2-sigmoid-schedule"])
    finally:
        grader.close()
    assert graded.error == "" and all(t.points == t.max_points for t in graded.tasks), graded.first_failure


@needs_sandbox
def test_the_sandbox_shows_a_runner_its_python_and_its_slot_only(tmp_path):
    """What a runner's sandbox holds: no repository beyond the runner's modules, no home, a read-only root."""
    import subprocess
    import sys
    slot = str(tmp_path / "slot")
    os.makedirs(slot)
    hidden = [os.path.join(REPO, "ddpm.py"), os.path.join(REPO, "staff", "grade.py"), STAFF_FILE, str(tmp_path),
              os.path.join(REPO, "staff", "mutants"), "/etc/shadow", "/sys"]
    script = ("import os, sys\n"
              f"repo = {REPO!r}\n"
              "print(sorted(os.listdir(repo)), sorted(os.listdir(os.path.join(repo, 'staff', 'graded'))))\n"
              f"print([p for p in {hidden!r} if os.path.exists(p)])\n"
              "open('/grading/written', 'w').write('x')\n"
              "try:\n    open('/written', 'w')\nexcept OSError as error:\n    print('root', error.errno)\n")
    result = subprocess.run(sandbox.arguments(slot) + ["--", sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, universal_newlines=True, timeout=60)
    lines = result.stdout.splitlines()
    assert result.returncode == 0, result.stdout
    venv = os.path.relpath(sys.prefix, REPO).split(os.sep)[0] if sys.prefix.startswith(REPO + os.sep) else None
    expected_repo = sorted({"staff"} | ({venv} if venv else set()))         # .venv or .venv-oldest in CI
    assert lines[0] == f"{expected_repo} {sorted(['__init__.py', 'probes.py', 'runner.py'])}", lines[0]
    assert lines[1] == "[]", lines[1]
    assert lines[2] == "root 30" and os.path.isfile(os.path.join(slot, "written"))     # EROFS


# --------------------------------------------------------------------------------------------------------------
# The command line: a missing sandbox, --no-sandbox, bad paths
# --------------------------------------------------------------------------------------------------------------

def run_main(argv) -> tuple:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = grade.main(argv)
        except SystemExit as stop:
            code = stop.code
    return code, out.getvalue(), err.getvalue()


def test_a_missing_sandbox_tool_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(sandbox, "TOOL", "bwrap-not-installed-here")
    monkeypatch.setattr(sandbox, "_PROBLEM", {})
    code, out, err = run_main([REPO, "--csv", str(tmp_path / "grade.csv")])
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert "not installed" in err and "apt-get install bubblewrap" in err and "user namespaces" in err
    assert "--no-sandbox" in err and not os.path.exists(str(tmp_path / "grade.csv"))


def test_a_sandbox_that_cannot_start_is_refused_with_its_cause(tmp_path, monkeypatch):
    """As where unprivileged user namespaces are restricted: bwrap is there but fails."""
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: setting up uid map: Permission denied' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sandbox, "TOOL", str(fake))
    monkeypatch.setattr(sandbox, "_PROBLEM", {})
    code, out, err = run_main(["--class", REPO, "--out", str(tmp_path / "reports")])
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "cannot start a sandbox here (bwrap: setting up uid map: Permission denied)" in err
    assert "user namespaces" in err and "--no-sandbox" in err and not (tmp_path / "reports").exists()


def test_no_sandbox_warns_on_every_run(tmp_path):
    project = copy_project(str(tmp_path / "p"))
    code, out, err = run_main([project, "--no-sandbox", "--no-csv", "--task", "sheet2-sigmoid-schedule",
                               "--workers", "1"])
    assert code == 0 and "warning: --no-sandbox" in err and "1/1" in out, (out, err)


def test_bad_paths_are_refused_in_one_line_and_write_nothing(tmp_path):
    not_a_zip = tmp_path / "notes.txt"
    not_a_zip.write_text("hello")
    empty_class = tmp_path / "empty-class"
    empty_class.mkdir()
    for argv, words in ([[str(tmp_path / "no-such-folder")], "does not exist"],
                        [[str(not_a_zip)], "neither a folder nor a zip file"],
                        [["--class", str(tmp_path / "no-such-class"), "--out", str(tmp_path / "out")], "not a folder"],
                        [["--class", str(empty_class), "--out", str(tmp_path / "out")], "holds no submission"]):
        code, out, err = run_main(argv + ["--csv", str(tmp_path / "grade.csv")] if "--class" not in argv else argv)
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, (argv, err)
        assert not (tmp_path / "grade.csv").exists() and not (tmp_path / "out").exists()
