"""The handout and the grader: regions, the student copy, no answer handed out, each task on its own, no pass
unearned, limits, points and a class in one command. Not handed out to students.

All gradings share one Grader (two runner processes); identical task workspaces are judged once, so a mutant or a
variant costs one job of its own task.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

from staff import grade
from staff import handout
from staff.graded import probes, sandbox, verdicts

REPO = handout.REPO
MUTANTS_FILE = os.path.join(REPO, "staff", "mutants", "mutants.json")
VARIANTS_FILE = os.path.join(REPO, "staff", "mutants", "variants.json")
MUTANT_KEYS = {"name", "task", "file", "old", "new", "why"}
TIMEOUT = 60
SANDBOXED = sandbox.problem() is None      # tests/test_sandbox.py tries to get out; here grading is graded
SHEET1_POINTS = {"sheet1-convblock": 1, "sheet1-encoder": 1, "sheet1-decoder": 1, "sheet1-embedding": 1,
                 "sheet1-final-block": 1, "sheet1-unet-forward": 1.5, "sheet1-parameter-check": 0.5,
                 "sheet1-schedule": 2, "sheet1-algorithm1": 2, "sheet1-algorithm2": 1}

# Attacks and accidents, each a replacement inside one region: (name, task, file, old, new).
CONVBLOCK_FORWARD = "        h1 = self.sub_block1(x)\n"
Q_SAMPLE = "        return extract(self.sqrt_alpha_bar_t, t) * y0 + extract(self.sqrt_one_minus_alpha_bar_t, t) * noise\n"
ATTACKS = {
    "syntax-error-in-the-unet": ("sheet1-convblock", "networks/Conditional_UNet.py", CONVBLOCK_FORWARD,
                                 "        h1 = self.sub_block1(x\n"),
    "syntax-error-in-the-test-loop": ("sheet2-test-loop", "training.py", "    results = {}\n",
                                      "    results = {\n"),
    "exception": ("sheet2-q-sample", "ddpm.py", Q_SAMPLE, "        raise RuntimeError('oops')\n"),
    "crash": ("sheet2-q-sample", "ddpm.py", Q_SAMPLE, "        import os; os.kill(os.getpid(), 11)\n"),
    "fifty-gigabytes": ("sheet2-q-sample", "ddpm.py", Q_SAMPLE,
                        "        import torch as _t; _t.empty(50 * 10 ** 9, dtype=_t.uint8).fill_(1)\n"),
    "patches-pytest-and-the-plugin": ("sheet2-q-sample", "ddpm.py", Q_SAMPLE,
        "        import sys, pytest, _pytest.reports\n"
        "        _pytest.reports.TestReport.passed = property(lambda self: True)\n"
        "        sys.modules.setdefault('tests.grading.plugin', type(sys)('fake')).one_line_reason = lambda r: ''\n"
        "        return y0\n"),
    "writes-a-fake-record-and-exits-0": ("sheet2-q-sample", "ddpm.py", Q_SAMPLE,
        "        import glob, json, os\n"
        "        for name in glob.glob(os.path.join(os.path.dirname(os.getcwd()), '*', '*.in.npz')):\n"
        "            open(name.replace('.in.npz', '.err'), 'w').close()\n"
        "        open('grade.jsonl', 'w').write(json.dumps({'event': 'result', 'outcome': 'passed'}))\n"
        "        os._exit(0)\n"),
    "writes-outside": ("sheet2-q-sample", "ddpm.py", Q_SAMPLE,
        "        import os\n"
        "        open(os.path.join(os.path.expanduser('~'), 'written-by-the-student'), 'w').write('x')\n" + Q_SAMPLE),
}


def load(path: str) -> list:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def copy_project(source: str, target: str) -> str:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(*grade.COPY_IGNORE, "staff"))
    return target


def replace_once(project: str, path: str, old: str, new: str) -> None:
    location = os.path.join(project, path)
    text = handout.read_text(location)
    assert text.count(old) == 1, f"{old!r} must occur once in {path}"
    handout.write_text(location, text.replace(old, new))


def tree_digest(folder: str) -> str:
    digest = hashlib.sha256()
    for current, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(current, name)
            digest.update(os.path.relpath(path, folder).encode())
            with open(path, "rb") as handle:
                digest.update(handle.read())
    return digest.hexdigest()


def by_task(submission) -> dict:
    return {t.task: t for t in submission.tasks}


# --------------------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def handout_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("handout") / "handout")
    handout.write_handout(REPO, out, include_untracked=True)
    return out


@pytest.fixture(scope="module")
def grader(tmp_path_factory):
    scratch = str(tmp_path_factory.mktemp("grading"))
    found = grade.Grader(scratch, workers=2, timeout=TIMEOUT, sandboxed=SANDBOXED)
    yield found
    found.close()


@pytest.fixture(scope="module")
def students(handout_dir, tmp_path_factory):
    """name -> project folder: the reference, the handout, every mutant, every variant and every attack."""
    folders = {"reference": copy_project(REPO, str(tmp_path_factory.mktemp("reference") / "p")),
               "handout": handout_dir}
    for kind, path in (("mutant", MUTANTS_FILE), ("variant", VARIANTS_FILE)):
        for item in load(path):
            project = copy_project(REPO, str(tmp_path_factory.mktemp(kind) / item["name"]))
            replace_once(project, item["file"], item["old"], item["new"])
            folders[f"{kind}:{item['name']}"] = project
    for name, (_task, path, old, new) in ATTACKS.items():
        project = copy_project(REPO, str(tmp_path_factory.mktemp("attack") / name))
        replace_once(project, path, old, new)
        folders[f"attack:{name}"] = project
    edited = copy_project(REPO, str(tmp_path_factory.mktemp("attack") / "edited-tests"))
    replace_once(edited, "ddpm.py", "return betas.clamp(max=max_beta)", "return betas")
    os.makedirs(os.path.join(edited, "tests"), exist_ok=True)
    handout.write_text(os.path.join(edited, "tests", "test_diffusion.py"), "def test_nothing():\n    pass\n")
    handout.write_text(os.path.join(edited, "conftest.py"),
                       "def pytest_collection_modifyitems(items):\n    items.clear()\n")
    folders["attack:edited-tests"] = edited
    unmarked = copy_project(REPO, str(tmp_path_factory.mktemp("attack") / "markers-edited-away"))
    replace_once(unmarked, "ddpm.py", "        # BEGIN SOLUTION sheet2-q-sample q_sample (eq. 3)\n", "")
    folders["attack:markers-edited-away"] = unmarked
    return folders


@pytest.fixture(scope="module")
def gradings(grader, students):
    from concurrent.futures import ThreadPoolExecutor
    digests = {name: tree_digest(folder) for name, folder in students.items()}
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(grader.grade, folder, name) for name, folder in students.items()}
        found = {name: by_task(future.result()) for name, future in futures.items()}
    for name, folder in students.items():
        assert tree_digest(folder) == digests[name], f"{name}: the grader wrote into the submission"
    return found


# --------------------------------------------------------------------------------------------------------------
# Regions, tasks, checks and points
# --------------------------------------------------------------------------------------------------------------

def test_regions_name_known_tasks_and_every_task_has_regions_checks_and_points():
    regions = handout.regions_of_repository(REPO)
    for path, found in regions.items():
        handout.check_tasks(found, path)
    with_regions = {r.task for found in regions.values() for r in found}
    assert with_regions == set(handout.TASKS)
    assert {c.task for c in verdicts.CHECKS} == set(handout.TASKS)
    assert set(grade.read_points()) == set(handout.TASKS)
    names = [c.name for c in verdicts.CHECKS]
    assert len(names) == len(set(names)) and all(c.probe in probes.PROBES for c in verdicts.CHECKS)


def test_points_are_the_sheets():
    points = grade.read_points()
    assert {task: points[task] for task in SHEET1_POINTS} == SHEET1_POINTS
    assert grade.task_points(2, [grade.CheckResult("a", True, "", 3), grade.CheckResult("b", False, "x", 1)]) == 1.5


def test_every_task_instruction_fits_two_comment_lines():
    for task_id in handout.TASKS:
        region = handout.Region(task_id, "what", " " * 12, 0, 1)
        assert len(handout.stub_body(region)) <= 3, f"{task_id}: shorten its instruction in TASKS"


@pytest.mark.parametrize("marker_lines, message", [
    (["    # BEGIN SOLUTION sheet1-convblock\n", "    # END SOLUTION\n"], "malformed"),
    (["    # BEGIN SOLUTION sheet1-convblock a\n", "    x = 1\n"], "without an END"),
    (["    x = 1\n", "    # END SOLUTION\n"], "without a BEGIN"),
    (["    # BEGIN SOLUTION sheet1-convblock a\n", "    # BEGIN SOLUTION sheet1-convblock b\n"], "inside the region"),
    (["    # BEGIN SOLUTION sheet1-convblock a\n", "        # END SOLUTION\n"], "indented differently"),
    (["    # BEGIN SOLUTION no-such-task a\n", "    # END SOLUTION\n"], "unknown task"),
])
def test_bad_markers_are_refused_with_file_and_line(marker_lines, message):
    with pytest.raises(handout.RegionError, match=message) as error:
        handout.stub_regions("def f():\n" + "".join(marker_lines), "demo.py")
    assert str(error.value).startswith("demo.py:")


def test_stub_keeps_markers_and_raises_the_task_and_fill_restores_crlf_text():
    reference = ("def f(x):\r\n    y = 2 * x\r\n    # BEGIN SOLUTION sheet2-q-sample the closed form\r\n"
                 "    return y + 1\r\n    # END SOLUTION\r\n")
    stubbed = handout.stub_regions(reference, "demo.py")
    lines = stubbed.splitlines(keepends=True)
    assert lines[-2] == '    raise NotImplementedError("sheet2-q-sample: the closed form")\r\n'
    assert all(line.endswith("\r\n") for line in lines)
    assert handout.fill_regions(stubbed, reference, "demo.py") == reference
    assert handout.fill_regions(stubbed, reference, "demo.py", tasks=["sheet1-convblock"]) == stubbed


def test_mutants_and_variants_are_well_formed():
    for path in (MUTANTS_FILE, VARIANTS_FILE):
        items = load(path)
        assert len({m["name"] for m in items}) == len(items)
        for item in items:
            assert set(item) == MUTANT_KEYS and item["task"] in handout.TASKS and item["old"] != item["new"]
            text = handout.read_text(os.path.join(REPO, item["file"]))
            assert text.count(item["old"]) == 1, item["name"]
            start = text.index(item["old"])
            first, last = text[:start].count("\n"), text[:start + len(item["old"]) - 1].count("\n")
            inside = [r for r in handout.find_regions(text.splitlines(keepends=True), item["file"])
                      if r.begin < first and last < r.end]
            assert inside and inside[0].task == item["task"], item["name"]
    assert any("misprint" in m["name"] and "sqrt(alpha_t)" not in m["old"] for m in load(MUTANTS_FILE))


def test_staff_tools_run_as_modules_from_the_root_and_as_files_from_anywhere(tmp_path):
    listed = subprocess.run([sys.executable, "-m", "staff.handout", "--list"], cwd=REPO, stdout=subprocess.PIPE,
                            universal_newlines=True)
    assert listed.returncode == 0 and "sheet1-convblock:" in listed.stdout
    for script in ("handout.py", "grade.py"):
        result = subprocess.run([sys.executable, os.path.join(REPO, "staff", script), "--help"], cwd=str(tmp_path),
                                stdout=subprocess.PIPE, universal_newlines=True)
        assert result.returncode == 0 and "usage:" in result.stdout


# --------------------------------------------------------------------------------------------------------------
# The student copy: what it holds, and no answer in it
# --------------------------------------------------------------------------------------------------------------

STUDENT_FILES = {
    ".gitignore", "README.txt", "answers.txt", "ddpm.py", "training.py", "train_mnist.py", "train_cifar10.py",
    "train_butterflies.py", "utils.py", "requirements.txt", "requirements-oldest.txt", "requirements-butterflies.txt",
    "networks/__init__.py",
    "networks/Conditional_UNet.py", "lab/__init__.py", "lab/checkpoints.py", "lab/cli.py", "lab/ema.py",
    "lab/few_step.py", "lab/generation.py", "lab/image_data.py", "lab/mixtures.py", "lab/run_files.py",
    "lab/speed.py",
    "lab/train_config.py", "tests/conftest.py", "tests/grading/plugin.py", "tests/test_unet.py",
    "tests/test_diffusion.py", "tools/__init__.py", "tools/visualize.py",
}


def test_the_student_copy_holds_what_the_tasks_need_and_nothing_else(handout_dir):
    assert set(handout.repository_files(handout_dir)) == STUDENT_FILES
    visualize = handout.read_text(os.path.join(handout_dir, "tools", "visualize.py"))
    assert "Implement visualization helpers" in visualize and "NotImplementedError" in visualize
    butterflies = handout.read_text(os.path.join(handout_dir, "train_butterflies.py"))
    assert "Butterfly dataset" in butterflies and "NotImplementedError" in butterflies


def test_handout_readme_sets_up_both_pythons_names_the_misprint_and_the_points(handout_dir):
    readme = handout.read_text(os.path.join(handout_dir, "README.txt"))
    for needle in ("Group members", "python3.8 -m venv .venv && .venv/bin/pip install -r requirements-oldest.txt",
                   "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt",
                   "sqrt(alpha_t) y_0", "sqrt(alpha_bar_t) y_0", "How your work is graded", "What to hand in",
                   "sheet1-unet-forward      1.5"):
        assert needle in readme, needle
    assert "grade.py" not in readme and "staff/" not in readme
    answers = " ".join(handout.read_text(os.path.join(handout_dir, "answers.txt")).split())
    assert all(" ".join(q.text.split()) in answers for q in handout.QUESTIONS)


def solution_lines(repo: str = REPO) -> dict:
    """(task, what) -> the code lines of each region, stripped; lines shorter than 25 characters are too common
    to count (return y, else:, ...)."""
    found = {}
    for path, regions in handout.regions_of_repository(repo).items():
        lines = handout.read_text(os.path.join(repo, path)).splitlines()
        for region in regions:
            code = [line.split("#")[0].strip() for line in lines[region.begin + 1:region.end]]
            found[(region.task, region.what)] = [line for line in code if len(line) >= 25]
    return found


def normalised(line: str) -> str:
    """A code line without spaces and without the objects before attributes: self.encoder1(x) and
    unet.encoder1(x) read the same."""
    return re.sub(r"\b[A-Za-z_]\w*\.", ".", re.sub(r"\s+", "", line.split("#")[0]))


def test_no_shipped_file_holds_a_regions_solution(handout_dir):
    """Every shipped text file is searched for every line of every region (the regions themselves are stubs)."""
    leaks = []
    for path in handout.repository_files(handout_dir):
        try:
            text = handout.read_text(os.path.join(handout_dir, path))
        except UnicodeDecodeError:
            continue
        shipped = {normalised(line) for line in text.splitlines()}
        for (task, what), lines in solution_lines().items():
            leaks += [f"{path}: {task} {what}: {line}" for line in lines if normalised(line) in shipped]
    assert not leaks, "\n".join(leaks)


def test_the_leak_search_finds_a_copied_region(tmp_path):
    """The search above catches a region's line copied under another object's name."""
    lines = solution_lines()[("sheet1-unet-forward", "UNet.forward")]
    copied = [line.replace("self.", "network.") for line in lines]
    assert {normalised(line) for line in copied} & {normalised(line) for line in lines}


# A call instead of the answer: every function and method the student copy ships, called with the arguments of a
# region (as given, with one tensor argument given a leading axis, and with or without a DDPM as first argument),
# in the handout with every other region filled in; a result equal to the reference's answer is a leak.
# (task, what) of the regions searched -> the region's function, as LEAK_SEARCH names it.
CALLED_REGIONS = {
    ("sheet2-guidance", "classifier_free_guidance"): "classifier_free_guidance",
    ("sheet2-guidance", "guided_noise: the null class in the same batch"): "guided_noise",
    ("sheet2-q-sample", "q_sample (eq. 3)"): "q_sample",
    ("sheet2-p-losses", "p_losses"): "p_losses",
    ("sheet1-schedule", "ddpm_schedule"): "ddpm_schedule",
    ("sheet2-cosine-schedule", "cosine_beta_schedule"): "cosine_beta_schedule",
    ("sheet2-sigmoid-schedule", "sigmoid_beta_schedule"): "sigmoid_beta_schedule",
}
LEAK_SEARCH = r'''
import importlib, inspect, json, os, signal, sys
import numpy as np
import torch

rng = np.random.default_rng(0)
def t32(*shape):
    return torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
Y, NOISE, COND, UNCOND = t32(3, 1, 4, 4), t32(3, 1, 4, 4), t32(3, 1, 4, 4), t32(3, 1, 4, 4)
C, STEPS = torch.eye(10)[[2, 5, 7]], torch.tensor([3, 17, 40])
ARGUMENTS = {"classifier_free_guidance": (COND, UNCOND, 2.0), "guided_noise": (Y, 17, C, 2.0),
             "q_sample": (Y, STEPS, NOISE), "p_losses": (Y, STEPS, C, NOISE), "ddpm_schedule": (1e-4, 0.02, 50),
             "cosine_beta_schedule": (50,), "sigmoid_beta_schedule": (1e-4, 0.02, 50)}


class Linear(torch.nn.Module):
    def forward(self, x, t, c):
        t = t.reshape(-1).float().expand(x.shape[0]) if t.numel() == 1 else t.reshape(-1).float()
        return 0.5 * x + (t + c.float() @ torch.linspace(-1, 1, c.shape[-1])).view(-1, 1, 1, 1)


def load(workspace):
    names = []
    for folder, dirs, files in os.walk(workspace):
        dirs[:] = sorted(d for d in dirs if d not in ("tests", "__pycache__"))
        for file in sorted(files):
            if file.endswith(".py"):
                name = os.path.relpath(os.path.join(folder, file), workspace)[:-3].replace(os.sep, ".")
                names.append(name[:-len(".__init__")] if name.endswith(".__init__") else name)
    tops = {name.split(".")[0] for name in names}
    for name in list(sys.modules):
        if name.split(".")[0] in tops:
            del sys.modules[name]
    sys.path[0] = workspace
    os.chdir(workspace)
    modules = {}
    for name in names:
        try:
            modules[name] = importlib.import_module(name)
        except BaseException:
            pass
    return modules


def new_model(modules):
    """A fresh DDPM (lab.generation's SamplingDDPM) around Linear, or None where the schedule is a stub."""
    try:
        return modules["lab.generation"].SamplingDDPM(Linear(), 1e-4, 0.02, 50, device="cpu")
    except BaseException:
        return None


def candidates(modules):
    for module_name, module in modules.items():
        for name, value in list(vars(module).items()):
            if name.startswith("__"):
                continue
            if inspect.isfunction(value) and value.__module__ == module_name:
                yield f"{module_name}.{name}", value
            elif inspect.isclass(value) and value.__module__ == module_name:
                for attribute, member in list(vars(value).items()):
                    member = member.__func__ if isinstance(member, staticmethod) else member
                    if inspect.isfunction(member) and not attribute.startswith("__"):
                        yield f"{module_name}.{name}.{attribute}", member


def forms(arguments, modules):
    tensors = [i for i, value in enumerate(arguments) if isinstance(value, torch.Tensor)]
    for variant in [arguments] + [arguments[:i] + (arguments[i][None],) + arguments[i + 1:] for i in tensors]:
        yield variant
        model = new_model(modules)
        if model is not None:
            yield (model,) + variant


def same(result, expected):
    if isinstance(result, (tuple, list)):
        return any(same(item, expected) for item in result)
    if isinstance(expected, dict):
        return isinstance(result, dict) and all(key in result and same(result[key], value)
                                                for key, value in expected.items())
    if not isinstance(result, torch.Tensor) or not isinstance(expected, torch.Tensor):
        return False
    result = result.detach()
    if result.shape != expected.shape and result.shape[:1] == (1,):
        result = result[0]
    return result.shape == expected.shape and bool(torch.allclose(result.double(), expected.double(), rtol=1e-5,
                                                                  atol=1e-6))


def timeout(*_):
    raise TimeoutError


def leaks_in(workspace, region, expected):
    modules = load(workspace)
    found = []
    for label, function in candidates(modules):
        for arguments in forms(ARGUMENTS[region], modules):
            try:
                inspect.signature(function).bind(*arguments)
            except (TypeError, ValueError):
                continue
            signal.alarm(2)
            try:
                if same(function(*arguments), expected):
                    found.append(label)
                    break
            except BaseException:
                pass
            finally:
                signal.alarm(0)
                os.chdir(workspace)
    return found


signal.signal(signal.SIGALRM, timeout)
reference, cases = sys.argv[1], json.loads(sys.argv[2])
modules = load(reference)
expected = {}
for region, arguments in ARGUMENTS.items():
    owner = new_model(modules) if region in ("guided_noise", "q_sample", "p_losses") else modules["ddpm"]
    expected[region] = (modules["ddpm"].DDPM.ddpm_schedule if region == "ddpm_schedule"
                        else getattr(owner, region))(*arguments)
print(json.dumps({label: leaks_in(workspace, region, expected[region]) for label, region, workspace in cases}))
'''
LEAKY_MIXTURE = '''

def _composed_noise(self, y_t, t, conditions, w):
    """Mixture guidance as lab/generation.py once shipped it: with one class it is eq. 5."""
    from ddpm import classifier_free_guidance
    n = conditions.shape[1]
    classes = torch.cat((conditions.reshape(n, -1), torch.zeros(n, conditions.shape[-1])))
    noise = self.noise_of_copies(y_t, t, classes).float().view(-1, *y_t.shape)
    return classifier_free_guidance(noise[0], noise[1], w)


SamplingDDPM.composed_noise = _composed_noise
'''


def with_one_region_stubbed(filled: str, target: str, task: str, what: str) -> None:
    """A copy of a filled-in handout with the one region (task, what) back to its stub."""
    shutil.copytree(filled, target)
    for path, regions in handout.regions_of_repository(REPO).items():
        for region in regions:
            if (region.task, region.what) == (task, what):
                lines = handout.read_text(os.path.join(target, path)).splitlines(keepends=True)
                lines[region.begin + 1:region.end] = handout.stub_body(region)
                handout.write_text(os.path.join(target, path), "".join(lines))


@pytest.fixture(scope="module")
def called_leaks(handout_dir, tmp_path_factory):
    """Label -> the shipped functions whose call gives a region's answer; labels: each (task, what) of
    CALLED_REGIONS, and 'planted' (guided_noise, with the mixture guidance lab/generation.py used to ship)."""
    base = tmp_path_factory.mktemp("called")
    filled = str(base / "filled")
    handout.fill_handout(handout_dir, REPO, filled)
    cases = []
    for (task, what), region in CALLED_REGIONS.items():
        workspace = str(base / region)
        with_one_region_stubbed(filled, workspace, task, what)
        cases.append([f"{task} {what}", region, workspace])
    planted = str(base / "planted")
    with_one_region_stubbed(filled, planted, "sheet2-guidance", "guided_noise: the null class in the same batch")
    with open(os.path.join(planted, "lab", "generation.py"), "a", encoding="utf-8") as handle:
        handle.write(LEAKY_MIXTURE)
    cases.append(["planted", "guided_noise", planted])
    result = subprocess.run([sys.executable, "-c", LEAK_SEARCH, filled, json.dumps(cases)], cwd=str(base),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=600,
                            env=dict(os.environ, MPLBACKEND="Agg", PYTHONDONTWRITEBYTECODE="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_no_shipped_function_gives_a_regions_answer_when_called(called_leaks):
    leaks = {label: found for label, found in called_leaks.items() if found and label != "planted"}
    assert not leaks, leaks
    assert len(called_leaks) == len(CALLED_REGIONS) + 1


def test_the_call_search_finds_a_planted_mixture_guidance(called_leaks):
    """The search above catches what lab/generation.py used to ship: mixture guidance that is eq. 5 for one
    class, called with c[None]."""
    assert "lab.generation.SamplingDDPM.composed_noise" in called_leaks["planted"], called_leaks["planted"]


def test_handout_replaces_every_region_and_fill_gives_the_reference_back(handout_dir, tmp_path):
    for path, regions in handout.regions_of_repository(REPO).items():
        lines = handout.read_text(os.path.join(handout_dir, path)).splitlines(keepends=True)
        for region in handout.find_regions(lines, path):
            assert lines[region.begin + 1:region.end] == handout.stub_body(region)
    out = str(tmp_path / "filled")
    handout.fill_handout(handout_dir, REPO, out)
    for path in handout.repository_files(out):
        if path not in handout.REPLACED and path not in handout.STUB_FILES:
            with open(os.path.join(out, path), "rb") as mine, open(os.path.join(REPO, path), "rb") as theirs:
                assert mine.read() == theirs.read(), path


def test_handout_imports_its_public_tests_pass_or_stop_at_a_stub(handout_dir, tmp_path):
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests", "-rf"],
                            cwd=handout_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            universal_newlines=True, timeout=600, env=dict(os.environ, COLUMNS="500"))
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAILED")]
    assert failed, result.stdout[-3000:]
    assert all("NotImplementedError: sheet" in line for line in failed), "\n".join(failed)
    assert "error" not in result.stdout.splitlines()[-1], result.stdout[-3000:]
    script = subprocess.run([sys.executable, "networks/Conditional_UNet.py"], cwd=handout_dir,
                            stderr=subprocess.PIPE, universal_newlines=True)
    assert script.returncode != 0 and "NotImplementedError: sheet1-" in script.stderr.strip().splitlines()[-1]


# --------------------------------------------------------------------------------------------------------------
# Grading: the reference, the handout, mutants, correct variants, attacks
# --------------------------------------------------------------------------------------------------------------

def test_reference_gets_full_marks(gradings):
    for task, g in gradings["reference"].items():
        assert g.points == g.max_points and g.passed == g.total > 0, (task, g.first_failure)


def test_handout_gets_nothing_and_each_task_stops_at_its_own_stub(gradings):
    for task, g in gradings["handout"].items():
        assert g.points == 0, task
        assert all(r.reason.startswith(f"NotImplementedError: {task}: ") for r in g.results), \
            (task, [r.reason for r in g.results])


@pytest.mark.parametrize("variant", load(VARIANTS_FILE), ids=lambda v: v["name"])
def test_correct_variant_gets_full_marks(variant, gradings):
    for task, g in gradings[f"variant:{variant['name']}"].items():
        assert g.points == g.max_points, (variant["name"], task, g.first_failure)


@pytest.mark.parametrize("mutant", load(MUTANTS_FILE), ids=lambda m: m["name"])
def test_mutant_loses_its_task_and_only_that_one(mutant, gradings):
    grades = gradings[f"mutant:{mutant['name']}"]
    assert grades[mutant["task"]].points < grades[mutant["task"]].max_points, mutant["why"]
    for task, g in grades.items():
        if task != mutant["task"]:
            assert g.points == g.max_points, (task, g.first_failure)


@pytest.mark.parametrize("name, words", [
    ("syntax-error-in-the-unet", "SyntaxError"), ("syntax-error-in-the-test-loop", "SyntaxError"),
    ("exception", "RuntimeError: oops (ddpm.py, line"), ("crash", "crashed"),
    ("fifty-gigabytes", "memory limit"), ("patches-pytest-and-the-plugin", "q_sample"),
    ("writes-a-fake-record-and-exits-0", ""), ("writes-outside", ""),
])
def test_an_attack_or_accident_costs_its_task_only(name, words, gradings):
    task = ATTACKS[name][0]
    grades = gradings[f"attack:{name}"]
    if name == "writes-outside":      # allowed to write its HOME: the grader's, inside the grading folder
        assert grades[task].points == grades[task].max_points
        assert not os.path.exists(os.path.join(os.path.expanduser("~"), "written-by-the-student"))
        return
    assert grades[task].points == 0 and words in grades[task].first_failure, grades[task].first_failure
    for other, g in grades.items():
        if other != task:
            assert g.points == g.max_points, (name, other, g.first_failure)


def test_edited_tests_and_conftest_do_not_count(gradings):
    grades = gradings["attack:edited-tests"]
    assert grades["sheet2-cosine-schedule"].points < 1
    assert sum(g.points for g in grades.values()) == sum(g.max_points for g in grades.values()) - \
        grades["sheet2-cosine-schedule"].max_points + grades["sheet2-cosine-schedule"].points


def test_edited_away_markers_are_reported_for_their_task(gradings):
    grades = gradings["attack:markers-edited-away"]
    assert "markers edited away: ddpm.py: sheet2-q-sample" in grades["sheet2-q-sample"].first_failure
    assert all(g.points == g.max_points for task, g in grades.items() if task != "sheet2-q-sample")


def test_an_endless_loop_costs_its_task_only(tmp_path):
    project = copy_project(REPO, str(tmp_path / "hang"))
    replace_once(project, "ddpm.py", Q_SAMPLE, "        while True:\n            pass\n")
    grader = grade.Grader(str(tmp_path / "scratch"), workers=2, timeout=3, sandboxed=SANDBOXED)
    try:
        grades = by_task(grader.grade(project, tasks=["sheet2-q-sample", "sheet2-sigmoid-schedule"]))
    finally:
        grader.close()
    assert grades["sheet2-q-sample"].points == 0 and "timeout" in grades["sheet2-q-sample"].first_failure
    assert grades["sheet2-sigmoid-schedule"].points == 1


# --------------------------------------------------------------------------------------------------------------
# A class in one command
# --------------------------------------------------------------------------------------------------------------

def test_a_class_in_one_command(handout_dir, tmp_path):
    submissions = tmp_path / "submissions"
    submissions.mkdir()
    copy_project(REPO, str(submissions / "alice"))
    with zipfile.ZipFile(str(submissions / "bob.zip"), "w") as archive:       # the handout, zipped in a folder
        for path in handout.repository_files(handout_dir):
            archive.write(os.path.join(handout_dir, path), f"bob-project/{path}")
    out = tmp_path / "reports"
    tasks = ["sheet2-sigmoid-schedule", "sheet1-final-block"]
    assert grade.main(["--class", str(submissions), "--out", str(out), "--task", tasks[0], "--task", tasks[1],
                       "--workers", "2"] + ([] if SANDBOXED else ["--no-sandbox"])) == 1
    with open(str(out / "class.csv"), newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["submission"] for row in rows] == ["alice", "bob"]
    assert rows[0]["total"] == "2" and rows[0]["sheet1-final-block"] == "1" and rows[0]["first_failure"] == ""
    assert rows[1]["total"] == "0" and rows[1]["first_failure"].startswith("sheet")
    for name in ("alice", "bob"):
        assert (out / name / "report.txt").is_file() and (out / name / "report.csv").is_file()


def test_the_demo_class_holds_every_mutant_and_variant_and_copies(tmp_path):
    from staff import demo_class
    items = len(load(MUTANTS_FILE)) + len(load(VARIANTS_FILE))
    names = demo_class.make_class(str(tmp_path / "class"), size=items + 3)
    assert len(names) == items + 3 and sum(name.endswith(".zip") for name in names) == (items + 3 + 2) // 3
    kinds = [name.split("-")[0] for name in names]
    assert kinds.count("mutant") == len(load(MUTANTS_FILE)) and kinds.count("variant") == len(load(VARIANTS_FILE))
    assert kinds.count("handout") == 1 and kinds.count("reference") == 2
    assert grade.submissions_in(str(tmp_path / "class"))[0][0] == names[0].replace(".zip", "")
    with pytest.raises(ValueError, match="at least"):
        demo_class.make_class(str(tmp_path / "small"), size=items)
