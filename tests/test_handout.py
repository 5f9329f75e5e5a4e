"""The handout machinery: solution regions, the student handout, its inverse, the grader and the mutants.

Every grading runs pytest in subprocesses; the expensive ones (the reference, the handout, each mutant) run
together in one module fixture, as many at a time as there are CPUs. Not handed out to students.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest

from staff import grade
from staff import handout

REPO = handout.REPO
MUTANTS_FILE = os.path.join(REPO, "staff", "mutants", "mutants.json")
MUTANT_KEYS = {"name", "task", "file", "old", "new", "why"}
WORKERS = max(2, min(4, os.cpu_count() or 2))
TIMEOUT = 120            # per pytest process of a grading: generous, the machine may be busy


def load_mutants() -> list:
    """The mutants: plausible wrong solutions, each breaking one task (staff/mutants/mutants.json)."""
    with open(MUTANTS_FILE, encoding="utf-8") as handle:
        return json.load(handle)


def copy_project(source: str, target: str) -> str:
    """A copy of a project as the grader would take it (no .git, environments, results)."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(*grade.COPY_IGNORE))
    return target


def apply_mutant(project: str, mutant: dict) -> None:
    """Replace the mutant's old text, which must occur exactly once in its file, by its new text."""
    path = os.path.join(project, mutant["file"])
    text = handout.read_text(path)
    assert text.count(mutant["old"]) == 1, f"{mutant['name']}: its old text must occur once in {mutant['file']}"
    handout.write_text(path, text.replace(mutant["old"], mutant["new"]))


def run_in(folder: str, *args: str) -> subprocess.CompletedProcess:
    """Run the project's Python in ``folder`` on the given arguments."""
    return subprocess.run([sys.executable] + list(args), cwd=folder, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=TIMEOUT)


def by_task(grades) -> dict:
    return {g.task: g for g in grades}


def graded_tasks(inventory: dict) -> set:
    return {task for tasks in inventory.values() for task in tasks}


# --------------------------------------------------------------------------------------------------------------
# Fixtures: the handout, the inventory, and every expensive grading at once
# --------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def handout_dir(tmp_path_factory):
    """The handout of the reference, as ``python -m staff.handout --out DIR --include-untracked`` writes it."""
    out = str(tmp_path_factory.mktemp("handout") / "handout")
    handout.write_handout(REPO, out, include_untracked=True)   # untracked: a working tree not yet committed
    return out


@pytest.fixture(scope="module")
def inventory():
    """Node id -> tasks of the reference's graded tests."""
    found = grade.collect_inventory(REPO, timeout=TIMEOUT)
    assert found, "the reference has no graded tests"
    return found


@pytest.fixture(scope="module")
def gradings(handout_dir, inventory, tmp_path_factory):
    """'reference', 'handout' and 'mutant:<name>' -> the grade; all run at once, WORKERS at a time."""
    jobs = {"reference": REPO, "handout": handout_dir}
    for mutant in load_mutants():
        project = copy_project(REPO, str(tmp_path_factory.mktemp("mutant") / mutant["name"]))
        apply_mutant(project, mutant)
        jobs[f"mutant:{mutant['name']}"] = project
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        futures = {name: pool.submit(grade.grade, folder, REPO, TIMEOUT, None, inventory)
                   for name, folder in jobs.items()}
        return {name: by_task(future.result()) for name, future in futures.items()}


# --------------------------------------------------------------------------------------------------------------
# Regions and tasks
# --------------------------------------------------------------------------------------------------------------

def test_regions_of_the_reference_are_well_formed_and_name_known_tasks():
    regions = handout.regions_of_repository(REPO)
    for path, found in regions.items():
        handout.check_tasks(found, path)
    assert any(r.task == "sheet1-unet" for r in regions.get("networks/Conditional_UNet.py", []))


def test_every_task_instruction_fits_two_comment_lines():
    for task_id in handout.TASKS:
        region = handout.Region(task_id, "what", " " * 12, 0, 1)
        assert len(handout.stub_body(region)) <= 3, f"{task_id}: shorten its instruction in TASKS"


def test_graded_tests_name_one_known_task_literally(inventory):
    for nodeid, tasks in inventory.items():
        assert len(tasks) == 1, f"{nodeid} grades {tasks}: a test grades one task"
        assert tasks[0] in handout.TASKS, f"{nodeid}: unknown task {tasks[0]!r}"
        path = os.path.join(REPO, grade.file_of(nodeid))
        assert tasks[0] in grade.tasks_in_test_file(path), \
            f"{nodeid}: write the task id as a literal string, @pytest.mark." f"task({tasks[0]!r})"


def test_every_graded_task_has_a_region(inventory):
    with_regions = {r.task for found in handout.regions_of_repository(REPO).values() for r in found}
    assert graded_tasks(inventory) <= with_regions


@pytest.mark.parametrize("marker_lines, message", [
    (["    # BEGIN SOLUTION sheet1-unet\n", "    # END SOLUTION\n"], "malformed"),
    (["    # BEGIN SOLUTION sheet1-unet a\n", "    x = 1\n"], "without an END"),
    (["    x = 1\n", "    # END SOLUTION\n"], "without a BEGIN"),
    (["    # BEGIN SOLUTION sheet1-unet a\n", "    # BEGIN SOLUTION sheet1-unet b\n"], "inside the region"),
    (["    # BEGIN SOLUTION sheet1-unet a\n", "        # END SOLUTION\n"], "indented differently"),
    (["    # BEGIN SOLUTION no-such-task a\n", "    # END SOLUTION\n"], "unknown task"),
])
def test_bad_markers_are_refused_with_file_and_line(marker_lines, message):
    text = "def f():\n" + "".join(marker_lines)
    with pytest.raises(handout.RegionError, match=message) as error:
        handout.stub_regions(text, "demo.py")
    assert str(error.value).startswith("demo.py:")


def test_stub_keeps_markers_and_raises_the_task_and_fill_restores_crlf_text():
    reference = ("def f(x):\r\n"
                 "    y = 2 * x\r\n"
                 "    # BEGIN SOLUTION sheet2-q-sample the closed form\r\n"
                 "    return y + 1\r\n"
                 "    # END SOLUTION\r\n")
    stubbed = handout.stub_regions(reference, "demo.py")
    lines = stubbed.splitlines(keepends=True)
    assert lines[2] == "    # BEGIN SOLUTION sheet2-q-sample the closed form\r\n"
    assert lines[-2] == '    raise NotImplementedError("sheet2-q-sample: the closed form")\r\n'
    assert lines[-1] == "    # END SOLUTION\r\n"
    assert all(line.endswith("\r\n") for line in lines)
    namespace = {}
    exec(compile(stubbed, "demo.py", "exec"), namespace)
    with pytest.raises(NotImplementedError, match="^sheet2-q-sample: the closed form$"):
        namespace["f"](1)
    assert handout.fill_regions(stubbed, reference, "demo.py") == reference
    assert handout.fill_regions(stubbed, reference, "demo.py", tasks=["sheet1-unet"]) == stubbed


def test_staff_tools_run_as_modules_from_the_root_and_as_files_from_anywhere(tmp_path):
    listed = run_in(REPO, "-m", "staff.handout", "--list")
    assert listed.returncode == 0 and "sheet1-unet:" in listed.stdout, listed.stderr[-2000:]
    for script in ("handout.py", "grade.py"):
        result = run_in(str(tmp_path), os.path.join(REPO, "staff", script), "--help")
        assert result.returncode == 0 and "usage:" in result.stdout, (script, result.stderr[-2000:])


# --------------------------------------------------------------------------------------------------------------
# The handout
# --------------------------------------------------------------------------------------------------------------

def test_handout_holds_the_code_but_no_results_and_no_staff_files(handout_dir):
    handed = set(handout.repository_files(handout_dir))
    expected = {p for p in handout.repository_files(REPO, include_untracked=True) if handout.is_handed_out(p)}
    assert handed == expected | set(handout.REPLACED)
    assert not any(p.startswith("log_") or p.endswith(".pth") for p in handed)
    assert not any(p.startswith("staff/") for p in handed) and "tests/test_handout.py" not in handed
    assert not {"tools/bench.py", "tools/gpu_reference.sh", "tools/experiments.py"} & handed
    assert {"ddpm.py", "training.py", "networks/Conditional_UNet.py", "tests/grading/plugin.py"} <= handed
    classifiers = {p for p in handout.repository_files(REPO) if p.startswith("classifiers/") and p.endswith(".pt")}
    assert classifiers <= handed


def test_handout_readme_and_answers_template(handout_dir):
    readme = handout.read_text(os.path.join(handout_dir, "README.txt"))
    for needle in ("Group members", "pip install -r requirements.txt", "python -m pytest -q tests",
                   "How your work is graded", "What to hand in", "networks/Conditional_UNet.py: ConvBlock layers"):
        assert needle in readme
    assert "grade.py" not in readme and "staff" not in readme, "the grader is not handed out"
    flat = " ".join(readme.split())
    for path, regions in handout.regions_of_repository(REPO).items():
        for region in regions:
            assert region.task in readme and region.what in flat, (path, region.what)
    answers = handout.read_text(os.path.join(handout_dir, "answers.txt"))
    flat_answers = " ".join(answers.split())
    for question in handout.QUESTIONS:
        assert question.where in answers and " ".join(question.text.split()) in flat_answers
        assert question.ask in flat_answers


def test_handout_replaces_every_region_by_its_stub(handout_dir):
    for path, regions in handout.regions_of_repository(REPO).items():
        if not handout.is_handed_out(path):
            continue
        lines = handout.read_text(os.path.join(handout_dir, path)).splitlines(keepends=True)
        stubbed = handout.find_regions(lines, path)
        assert [(r.task, r.what) for r in stubbed] == [(r.task, r.what) for r in regions]
        for region in stubbed:
            assert lines[region.begin + 1:region.end] == handout.stub_body(region)


def test_filling_the_handout_gives_the_reference_back_byte_for_byte(handout_dir, tmp_path):
    out = str(tmp_path / "filled")
    filled = handout.fill_handout(handout_dir, REPO, out)
    assert "networks/Conditional_UNet.py" in filled
    for path in handout.repository_files(out):
        if path in handout.REPLACED:
            continue
        with open(os.path.join(out, path), "rb") as mine, open(os.path.join(REPO, path), "rb") as reference:
            assert mine.read() == reference.read(), path


def test_filling_one_task_leaves_the_other_tasks_stubbed(handout_dir, tmp_path):
    regions = handout.regions_of_repository(REPO)
    for task_id in sorted({r.task for found in regions.values() for r in found}):
        out = str(tmp_path / task_id)
        handout.fill_handout(handout_dir, REPO, out, tasks=[task_id])
        for path, found in regions.items():
            lines = handout.read_text(os.path.join(out, path)).splitlines(keepends=True)
            reference = handout.read_text(os.path.join(REPO, path)).splitlines(keepends=True)
            for mine, theirs in zip(handout.find_regions(lines, path), found):
                body = lines[mine.begin + 1:mine.end]
                if mine.task == task_id:
                    assert body == reference[theirs.begin + 1:theirs.end]
                else:
                    assert body == handout.stub_body(mine)


def test_handout_modules_import_and_the_unet_script_stops_at_its_first_stub(handout_dir):
    """Every module of the handout imports; then `python networks/Conditional_UNet.py` fails at a U-Net stub."""
    modules = sorted(p[:-3].replace("/", ".") for p in handout.repository_files(handout_dir)
                     if p.endswith(".py") and not p.startswith("tests/"))
    program = (f"import {', '.join(modules)}\n"
               f"print('imported')\n"
               f"import runpy\n"
               f"runpy.run_path('networks/Conditional_UNet.py', run_name='__main__')\n")
    result = run_in(handout_dir, "-c", program)       # one process: torch is imported once
    assert result.stdout.startswith("imported"), result.stderr[-2000:]
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("NotImplementedError: sheet1-unet: ")


def test_handout_ungraded_tests_pass_or_stop_at_a_stub(handout_dir, tmp_path):
    """The ungraded tests next to graded ones (argument checks...) pass unless they need a region."""
    files = grade.graded_test_files(handout_dir)
    record = str(tmp_path / "record.jsonl")
    command = grade.pytest_command(["-m", "not task", "--rootdir", handout_dir] + files, record)
    returncode = grade.run_with_timeout(command, handout_dir, TIMEOUT, str(tmp_path / "log.txt"))
    run = grade.read_record(record, returncode, TIMEOUT)
    assert returncode in grade.PYTEST_OK and not run.collect_errors, handout.read_text(str(tmp_path / "log.txt"))
    assert run.results, "no ungraded tests ran"
    stubs = tuple(f"NotImplementedError: {task_id}: " for task_id in handout.TASKS)
    for nodeid, result in run.results.items():
        assert result.outcome == "passed" or result.reason.startswith(stubs), f"{nodeid}: {result.reason}"


# --------------------------------------------------------------------------------------------------------------
# Grading the reference, the handout and the mutants
# --------------------------------------------------------------------------------------------------------------

def test_reference_passes_every_graded_task(gradings, inventory):
    reference = gradings["reference"]
    assert set(reference) == set(handout.TASKS)
    for task_id in graded_tasks(inventory):
        g = reference[task_id]
        assert g.total > 0 and g.passed == g.total, (task_id, g.failures[:3])


def test_handout_fails_every_graded_test_at_the_stub_of_its_own_task(gradings, inventory):
    """A test of task X stops at X's stub in the handout: it does not need another task's solution first."""
    for task_id in graded_tasks(inventory):
        g = gradings["handout"][task_id]
        assert g.total > 0 and g.passed == 0, task_id
        for nodeid, reason in g.failures:
            assert reason.startswith(f"NotImplementedError: {task_id}: "), f"{nodeid}: {reason}"


def test_mutants_are_well_formed():
    mutants = load_mutants()
    names = [m["name"] for m in mutants]
    assert len(names) == len(set(names)), "mutant names must be unique"
    for mutant in mutants:
        assert set(mutant) == MUTANT_KEYS, mutant.get("name")
        assert mutant["task"] in handout.TASKS and mutant["old"] != mutant["new"]
        text = handout.read_text(os.path.join(REPO, mutant["file"]))
        assert text.count(mutant["old"]) == 1, f"{mutant['name']}: old text must occur exactly once"
        start = text.index(mutant["old"])
        first = text[:start].count("\n")                               # line of the old text's first character
        last = text[:start + len(mutant["old"]) - 1].count("\n")       # line of its last character
        inside = [r for r in handout.find_regions(text.splitlines(keepends=True), mutant["file"])
                  if r.begin < first and last < r.end]
        assert inside and inside[0].task == mutant["task"], \
            f"{mutant['name']}: the old text must lie inside a region of {mutant['task']}"


@pytest.mark.parametrize("mutant", load_mutants(), ids=lambda m: m["name"])
def test_mutant_loses_its_task_and_only_that_one(mutant, gradings, inventory):
    grades = gradings[f"mutant:{mutant['name']}"]
    broken = grades[mutant["task"]]
    assert broken.total > 0, f"{mutant['task']} has no graded tests"
    assert broken.passed < broken.total, f"no test of {mutant['task']} notices: {mutant['why']}"
    for task_id in graded_tasks(inventory) - {mutant["task"]}:
        assert grades[task_id].passed == grades[task_id].total, (task_id, grades[task_id].failures[:3])


# --------------------------------------------------------------------------------------------------------------
# The grader's isolation, on a tiny project without torch (fast)
# --------------------------------------------------------------------------------------------------------------

TINY_CONFTEST = '''
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.grading import plugin as grading


def pytest_addoption(parser):
    grading.add_options(parser)


def pytest_configure(config):
    grading.configure(config)
'''
TINY_TESTS = {
    "tests/test_alpha.py": '''
import pytest
from alpha import double

@TASK_MARK("sheet1-unet")
def test_double():
    assert double(2) == 4

@TASK_MARK("sheet1-unet")
def test_double_negative():
    assert double(-1) == -2
''',
    "tests/test_beta.py": '''
import pytest
from beta import half

@TASK_MARK("sheet1-schedule")
def test_half():
    assert half(4) == 2

@TASK_MARK("sheet1-schedule")
def test_half_of_zero():
    assert half(0) == 0

def test_ungraded():
    assert True
''',
}
TINY_CODE = {"alpha.py": "def double(x):\n    return 2 * x\n", "beta.py": "def half(x):\n    return x / 2\n"}
TINY_TIMEOUT = 6


def write_files(root, files: dict) -> str:
    """Write a tiny project. TASK_MARK stands for pytest's task marker: written out here, it would make this
    file look like a graded test file to ``grade.graded_test_files``."""
    for path, text in files.items():
        text = textwrap.dedent(text).lstrip("\n").replace("@TASK_MARK(", "@pytest.mark." + "task(")
        handout.write_text(os.path.join(str(root), path), text)
    return str(root)


@pytest.fixture(scope="module")
def tiny_grader(tmp_path_factory):
    """A grader repository with two tasks, sheet1-unet (alpha.py) and sheet1-schedule (beta.py)."""
    root = tmp_path_factory.mktemp("tiny-grader")
    write_files(root, dict(TINY_TESTS, **TINY_CODE, **{"tests/conftest.py": TINY_CONFTEST}))
    os.makedirs(str(root / "tests" / "grading"))
    shutil.copy(os.path.join(REPO, "tests", "grading", "plugin.py"), str(root / "tests" / "grading" / "plugin.py"))
    return str(root)


@pytest.fixture(scope="module")
def tiny_grades(tiny_grader, tmp_path_factory):
    """Students: correct; alpha hangs; beta has a syntax error; alpha kills pytest; edited tests and conftest."""
    students = {
        "correct": dict(TINY_CODE),
        "hang": dict(TINY_CODE, **{"alpha.py": "import time\n\ndef double(x):\n    time.sleep(1000)\n"}),
        "syntax": dict(TINY_CODE, **{"beta.py": "def half(x):\n    return x /\n"}),
        "crash": dict(TINY_CODE, **{"alpha.py": "import os\n\ndef double(x):\n    os._exit(3)\n"}),
        "cheat": dict(TINY_CODE, **{"beta.py": "def half(x):\n    return 0\n",
                                    "tests/test_beta.py": "def test_nothing():\n    pass\n",
                                    "conftest.py": "import pytest\n\ndef pytest_collection_modifyitems(items):\n"
                                                   "    items.clear()\n"}),
    }
    folders = {name: write_files(tmp_path_factory.mktemp(name), files) for name, files in students.items()}
    with ThreadPoolExecutor(max_workers=len(folders)) as pool:
        futures = {name: pool.submit(grade.grade, folder, tiny_grader, TINY_TIMEOUT,
                                     ["sheet1-unet", "sheet1-schedule"])
                   for name, folder in folders.items()}
        return {name: by_task(future.result()) for name, future in futures.items()}


def _score(grades) -> dict:
    return {task: (g.passed, g.total) for task, g in grades.items()}


def test_grader_counts_a_correct_tiny_project(tiny_grades):
    assert _score(tiny_grades["correct"]) == {"sheet1-unet": (2, 2), "sheet1-schedule": (2, 2)}


def test_an_endless_test_costs_its_task_only(tiny_grades):
    grades = tiny_grades["hang"]
    assert _score(grades) == {"sheet1-unet": (0, 2), "sheet1-schedule": (2, 2)}
    assert grades["sheet1-unet"].first_failure.startswith("timeout: ")


def test_a_syntax_error_costs_the_tasks_of_its_module_only(tiny_grades):
    grades = tiny_grades["syntax"]
    assert _score(grades) == {"sheet1-unet": (2, 2), "sheet1-schedule": (0, 2)}
    assert "could not be imported: SyntaxError" in grades["sheet1-schedule"].first_failure
    assert "beta.py, line 2" in grades["sheet1-schedule"].first_failure


def test_a_crashing_test_costs_its_task_only(tiny_grades):
    grades = tiny_grades["crash"]
    assert _score(grades) == {"sheet1-unet": (0, 2), "sheet1-schedule": (2, 2)}
    assert "exit status 3" in grades["sheet1-unet"].first_failure


def test_the_students_tests_and_conftest_do_not_count(tiny_grades):
    grades = tiny_grades["cheat"]
    assert _score(grades) == {"sheet1-unet": (2, 2), "sheet1-schedule": (1, 2)}
    assert grades["sheet1-schedule"].first_failure == "assert 0 == 2"


def test_grade_table_and_csv(tiny_grades, tmp_path):
    grades = list(tiny_grades["hang"].values())
    table = grade.format_table(grades)
    assert "sheet1-unet" in table and "0/2" in table and "2/2" in table and "total" in table
    path = str(tmp_path / "grade.csv")
    grade.write_csv(grades, path)
    rows = handout.read_text(path).splitlines()
    assert rows[0] == "task,passed,total,first_failure" and rows[2].startswith("sheet1-schedule,2,2,")


def test_grade_refuses_to_overwrite_the_default_csv(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "grade.csv").write_text("mine\n")
    assert grade.main([str(tmp_path)]) == 2
    assert "grade.csv exists" in capsys.readouterr().err
    assert (tmp_path / "grade.csv").read_text() == "mine\n"


def test_grade_main_writes_a_named_csv_and_lists_tasks_without_tests(tiny_grader, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(grade, "REPO", tiny_grader)
    student = write_files(tmp_path / "student", TINY_CODE)
    named = tmp_path / "out.csv"
    named.write_text("old\n")
    assert grade.main([student, "--csv", str(named), "--timeout", str(TINY_TIMEOUT)]) == 0
    printed = capsys.readouterr().out
    assert "sheet2-guidance" in printed and "no graded tests yet" in printed
    assert named.read_text().splitlines()[1] == "sheet1-unet,2,2,"
