"""The process that runs students' code for the grader: one per grading worker, started by staff/grade.py.

It imports torch and the other libraries once, then reads jobs (JSON lines on stdin). For each job it forks a
process of its own, in a session of its own, which
  - limits its address space (RLIMIT_AS, --memory-bytes) and the size of any file it writes (RLIMIT_FSIZE),
  - drops the grader's folder from sys.path, puts the job's workspace first and makes it the working folder,
  - runs the job's probes (staff/graded/probes.py) one by one, each on freshly imported project modules,
    writing <io>/<check>.out.npz (the probe's arrays) or <io>/<check>.err (why it failed), then exits.
The runner kills the job's whole process group when it ends or when the job's time limit passes, and answers one
JSON line per job: {"id", "status": "finished" | "timeout" | "died", "detail", "seconds"}. It decides nothing
about a grade: staff/grade.py reads the arrays and judges them (staff/graded/verdicts.py) in its own process.

With --sandboxed the runner runs inside the grader's sandbox (bubblewrap, see staff/grade.py), in a process
namespace of its own, and leaves nothing of a job to the next: after each job it kills every other process of
the sandbox (also those a job started in a session of its own) and empties the sandbox's private /tmp (the jobs'
HOME) and /dev/shm.

Only for POSIX systems (fork, sessions, resource limits). Runs on Python 3.8.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

MAX_FILE_BYTES = 64 * 1024 * 1024
MEMORY_WORDS = ("can't allocate memory", "cannot allocate memory", "out of memory", "bad_alloc")
WARM_MODULES = ("numpy", "torch", "torch.nn.functional", "torchvision", "torchvision.utils", "torchvision.datasets",
                "torchvision.transforms", "matplotlib", "matplotlib.pyplot", "PIL.Image", "tqdm")


def warm_up() -> None:
    """Import the libraries every job needs, once, before any fork (the jobs then start in milliseconds)."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import importlib
    for name in WARM_MODULES:
        try:
            importlib.import_module(name)
        except Exception:                     # noqa: BLE001 (a library the project does not need)
            pass
    import torch
    torch.set_num_threads(1)
    from staff.graded import probes           # noqa: F401 (imported before the fork: the jobs find it loaded)


def project_names(workspace: str) -> set:
    """Top-level module names of a project: its .py files and its folders."""
    names = set()
    for entry in os.listdir(workspace):
        if entry.endswith(".py"):
            names.add(entry[:-3])
        elif os.path.isdir(os.path.join(workspace, entry)) and entry.isidentifier():
            names.add(entry)
    return names - {"staff"}


def purge(names: set) -> None:
    for module in list(sys.modules):
        if module.split(".")[0] in names:
            del sys.modules[module]


def describe(error: BaseException, workspace: str, memory_bytes: int) -> str:
    """An exception as one line: 'Type: message (file, line N)', naming the memory limit when it was reached."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = f"{type(error).__name__}: {message}".rstrip(": ")
    if isinstance(error, MemoryError) or any(word in str(error).lower() for word in MEMORY_WORDS):
        return (f"memory limit: the task needed more than the {memory_bytes / 2 ** 30:.1f} GiB address space a "
                f"grading process may use ({text[:200]})")
    where = ""
    if isinstance(error, SyntaxError) and error.filename:
        where = f" ({os.path.relpath(error.filename, workspace)}, line {error.lineno})"
        text = f"{type(error).__name__}: {error.msg}"
    else:
        frames = [f for f in traceback.extract_tb(error.__traceback__)
                  if os.path.abspath(f.filename).startswith(workspace + os.sep)]
        if frames:
            where = f" ({os.path.relpath(frames[-1].filename, workspace)}, line {frames[-1].lineno})"
    return (text[:400] + where)


def run_job(job: dict, memory_bytes: int) -> None:
    """In the forked process: limits, then the probes. Never returns."""
    status = 0
    try:
        import resource
        os.setsid()
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)      # an oversized write fails instead of killing
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_FILE_BYTES, MAX_FILE_BYTES))
        io_dir, workspace = job["io"], os.path.realpath(job["workspace"])
        log = os.open(os.path.join(io_dir, "log.txt"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        sys.path[:] = [workspace] + [p for p in sys.path if os.path.realpath(p or ".") not in (REPO, workspace)]
        sys.modules["staff.graded.verdicts"] = None     # the verdicts are not the student's to import
        os.chdir(workspace)
        import numpy as np
        import torch
        from staff.graded import probes
        names = project_names(workspace)
        for check, probe_name in job["probes"]:
            purge(names)
            inputs = dict(np.load(os.path.join(io_dir, f"{check}.in.npz"), allow_pickle=False))
            torch.manual_seed(0)
            try:
                outputs = probes.PROBES[probe_name](inputs)
                np.savez(os.path.join(io_dir, f"{check}.out.npz"), **outputs)
            except BaseException as error:     # noqa: BLE001 (SystemExit and KeyboardInterrupt from student code)
                with open(os.path.join(io_dir, f"{check}.err"), "w", encoding="utf-8") as handle:
                    handle.write(describe(error, workspace, memory_bytes))
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:                      # noqa: BLE001
        status = 70
    os._exit(status)


SANDBOX_SCRATCH = ("/tmp", "/dev/shm")     # the sandbox's writable places besides the job's own folder


def mount_points() -> set:
    """The mount points this process sees (/proc/self/mountinfo's fifth field, octal escapes decoded)."""
    try:
        with open("/proc/self/mountinfo") as file:
            fields = [line.split() for line in file]
    except OSError:
        return set()
    return {re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), f[4]) for f in fields if len(f) > 4}


def remove_except_mounts(path: str, mounts: set) -> None:
    """Delete ``path`` (file, link or folder tree), but keep every mount point inside it and the folders that
    lead to one: the read-only binds of the grader's Python or repository when these lie under /tmp."""
    import shutil
    if path in mounts:
        return
    if os.path.isdir(path) and not os.path.islink(path):
        if any(mount.startswith(path + os.sep) for mount in mounts):
            for entry in os.listdir(path):
                remove_except_mounts(os.path.join(path, entry), mounts)
        else:
            shutil.rmtree(path, ignore_errors=True)
        return
    try:
        os.unlink(path)
    except OSError:
        pass


def fresh_scratch() -> None:
    """Empty the sandbox's /tmp and /dev/shm and make the jobs' HOME (/tmp/home) anew."""
    mounts = mount_points()
    for folder in SANDBOX_SCRATCH:
        for entry in os.listdir(folder) if os.path.isdir(folder) else []:
            remove_except_mounts(os.path.join(folder, entry), mounts)
    os.makedirs(os.environ.get("HOME", "/tmp/home"), exist_ok=True)


def end_every_other_process() -> None:
    """Inside the sandbox's process namespace: kill every process but this runner and the namespace's init
    (pid 1), then reap this runner's children. What a job started in a session of its own ends here too."""
    for _ in range(3):
        others = [int(entry) for entry in os.listdir("/proc") if entry.isdigit() and int(entry) not in (1, os.getpid())]
        if not others:
            break
        for pid in others:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.01)
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                break
        except ChildProcessError:
            break


def serve(memory_bytes: int, sandboxed: bool = False) -> None:
    if sandboxed and os.getpid() > 2:
        raise SystemExit("runner.py: --sandboxed needs a process namespace of its own (the grader's sandbox)")
    if sandboxed:
        fresh_scratch()
    warm_up()
    reply = sys.stdout
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            run_job(job, memory_bytes)
        status, detail = wait_for(pid, float(job["timeout"]))
        try:
            os.killpg(pid, signal.SIGKILL)     # whatever the job left running
        except (ProcessLookupError, PermissionError):
            pass
        if sandboxed:
            end_every_other_process()
            fresh_scratch()
        reply.write(json.dumps({"id": job["id"], "status": status, "detail": detail,
                                "seconds": round(time.monotonic() - start, 3)}) + "\n")
        reply.flush()


def wait_for(pid: int, timeout: float) -> tuple:
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        done, code = os.waitpid(pid, os.WNOHANG)
        if done:
            if os.WIFSIGNALED(code):
                number = os.WTERMSIG(code)
                return "died", f"killed by signal {number} ({signal.Signals(number).name})"
            exit_code = os.WEXITSTATUS(code)
            return ("finished", "") if exit_code == 0 else ("died", f"exited with status {exit_code}")
        if time.monotonic() > deadline:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout", f"did not finish within the {timeout:g} s time limit of a task"
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--memory-bytes", type=int, required=True)
    parser.add_argument("--sandboxed", action="store_true",
                        help="inside the grader's sandbox: after each job end every other process and empty /tmp")
    args = parser.parse_args(argv)
    serve(args.memory_bytes, args.sandboxed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
