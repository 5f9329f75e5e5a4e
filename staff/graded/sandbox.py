"""The sandbox each grading runner (staff/graded/runner.py) and so every task's process runs in: bubblewrap.

bubblewrap (``bwrap``, the Debian/Ubuntu package ``bubblewrap``) starts a program in new Linux namespaces, without
root: a user namespace with no capabilities, its own processes, network (only a loopback, connected to nothing),
IPC, host name and mounts. The mounts are built from nothing, so a runner sees only what is listed here:

- read-only: the system's program folders (/usr and its /bin, /sbin, /lib* links), the few files of /etc that
  programs read (the dynamic linker's cache, time zone, user names, fonts), the Python that runs the grader (its
  prefixes and the folders of its sys.path outside this repository) and the runner's own two modules
  (staff/graded/runner.py and probes.py; not the verdicts, the mutants, the rest of staff/ or the reference);
- writable: ``SLOT``, the runner's slot, where the grader moves one job's workspace and io folder for the time of
  the job (so a job sees its own task's files and no other), a private /tmp (the jobs' HOME and TMPDIR) and
  /dev/shm, which the runner empties after each job;
- /proc of its own process namespace and a minimal /dev (null, zero, random, tty, ...); no /sys, /home, /root,
  /srv, /mnt or /work, no other submission, no report and no grading folder of another runner.

The root folder is read-only. The runner dies with the grader (--die-with-parent) and cannot reach the
grader's terminal (--new-session). Time, memory and file-size limits are set by the runner for each job, inside
the sandbox.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from typing import List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = "bwrap"
SLOT = "/grading"                    # a runner's slot as the sandbox sees it: SLOT/workspace, SLOT/io
HOME = "/tmp/home"                   # the jobs' HOME inside the sandbox (emptied after each job)
SYSTEM_FOLDERS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "passwd", "group", "nsswitch.conf",
             "fonts", "alternatives", "mime.types")
RUNNER_FILES = ("staff/__init__.py", "staff/graded/__init__.py", "staff/graded/runner.py", "staff/graded/probes.py")
FIX = ("install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap) and allow unprivileged user namespaces "
       "(Ubuntu 24.04: sysctl kernel.apparmor_restrict_unprivileged_userns=0; older Debian: sysctl "
       "kernel.unprivileged_userns_clone=1)")


def inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def python_folders() -> List[str]:
    """The folders the grader's Python needs: its prefixes, the folder of its executable and its sys.path entries
    outside this repository (site-packages, a user site), without those inside another."""
    candidates = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                  os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))}
    candidates |= {os.path.abspath(p) for p in sys.path if p and os.path.isdir(p)}
    repos = {REPO, os.path.realpath(REPO)}
    environments = {p for p in (sys.prefix, os.path.realpath(sys.prefix)) if p not in repos}
    kept: List[str] = []
    for path in sorted({os.path.realpath(p) for p in candidates} | candidates):
        if not os.path.isdir(path) or any(inside(repo, path) for repo in repos):
            continue                                  # "/" or a folder holding the reference
        if any(inside(path, repo) for repo in repos) and not any(inside(path, env) for env in environments):
            continue                                  # the reference itself; only a virtual environment in it
        if not any(inside(path, other) for other in kept):
            kept.append(path)
    return kept


def arguments(slot: str) -> List[str]:
    """bwrap's arguments (without the command) for a runner whose slot on this machine is ``slot``."""
    args = [TOOL, "--unshare-all", "--unshare-user", "--cap-drop", "ALL", "--die-with-parent", "--new-session",
            "--hostname", "grading"]
    for folder in SYSTEM_FOLDERS:
        if os.path.islink(folder):
            args += ["--symlink", os.readlink(folder), folder]
        elif os.path.isdir(folder):
            args += ["--ro-bind", folder, folder]
    for name in ETC_FILES:
        args += ["--ro-bind-try", os.path.join("/etc", name), os.path.join("/etc", name)]
    # The private /tmp comes before the Python folders and the runner's files: a Python or a clone of this
    # repository under /tmp (a CI checkout, say) is then bound into the private /tmp instead of hidden by it.
    args += ["--tmpfs", "/tmp"]
    for folder in python_folders():
        if not any(inside(folder, system) for system in SYSTEM_FOLDERS):
            args += ["--ro-bind", folder, folder]
    for path in RUNNER_FILES:
        args += ["--ro-bind", os.path.join(REPO, path), os.path.join(REPO, path)]
    args += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/dev/shm", "--remount-ro", "/dev",
             "--bind", slot, SLOT, "--chdir", "/tmp", "--remount-ro", "/"]
    return args


_PROBLEM: dict = {}


def problem() -> Optional[str]:
    """Why the sandbox cannot run here (one line), or None: bwrap is missing, or starting Python in it fails."""
    if "found" in _PROBLEM:
        return _PROBLEM["found"]
    found = None
    if shutil.which(TOOL) is None:
        found = f"{TOOL} (bubblewrap) is not installed"
    else:
        slot = tempfile.mkdtemp(prefix="grade-sandbox-check-")
        try:
            result = subprocess.run(arguments(slot) + ["--", sys.executable, "-c", "import sys"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, universal_newlines=True,
                                    timeout=60)
            if result.returncode != 0:
                lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
                found = f"{TOOL} cannot start a sandbox here ({lines[-1] if lines else f'exit {result.returncode}'})"
        except (OSError, subprocess.TimeoutExpired) as error:
            found = f"{TOOL} cannot start a sandbox here ({error})"
        finally:
            shutil.rmtree(slot, ignore_errors=True)
    _PROBLEM["found"] = found
    return found


def refusal(cause: str) -> str:
    """The one-line message with which the grader refuses to run students' code without its sandbox."""
    return f"grade.py: error: {cause}; {FIX}; or grade without a sandbox with --no-sandbox (not for untrusted code)"
