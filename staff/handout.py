"""Make the student handout from the reference solution, and put a reference's solutions back into a handout.

Every piece of code the sheets ask students to write is a *solution region*: the lines between a comment line
"# BEGIN SOLUTION <task-id> <what>" and the next "# END SOLUTION" line, both indented like the code between
them. <task-id> is a key of TASKS below; <what> says in a few words which piece it is (it ends up in the error
message of the handout's stub). Several regions may share one task id. Run from the repository root:

    python -m staff.handout --out DIR
        writes the student version of this repository to DIR (which must not exist or be empty): the files git
        tracks, less the results and the staff-only files (see ``is_handed_out``); in every .py file each region
        keeps its two marker lines and gets, between them, the task's instruction as a comment and
        ``raise NotImplementedError("<task-id>: <what>")``. README.txt becomes the students' README and
        answers.txt a template with the sheets' questions.
    python -m staff.handout --fill HANDOUT_DIR --from REFERENCE_DIR --out DIR [--task TASK_ID ...]
        the inverse: a copy of HANDOUT_DIR with the regions of the reference's files put back (of the named
        tasks only, with --task); every code file then equals the reference's byte for byte.
    python -m staff.handout --list
        the regions of this repository, task by task.

Only the standard library is used, and the code runs on Python 3.8.
"""
from __future__ import annotations

import argparse
import fnmatch
import os
import re
import shutil
import subprocess
import sys
import textwrap
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Task(NamedTuple):
    """A student task: where the sheets ask for it, and the sheet's instruction quoted in the handout's stubs."""
    title: str
    instruction: str


# Task id -> title and the sheet's instruction (quoted in every stub of the task, so at most about 200 characters).
# Sheet 1: ../shared/seeds/000_33643ade1e752521.txt, sheet 2: ../shared/seeds/003_b5fe0bdf44cae1a0.txt.
TASKS: Dict[str, Task] = {
    "sheet1-convblock": Task(
        "Sheet 1, task 1: ConvBlock",
        "Two sub-blocks Conv2D (kernel 3, stride 1, padding 1) -> BatchNorm2D -> GELU; residual (input + h2) if "
        "in == out channels, else (h1 + h2); normalised by sqrt(2)."),
    "sheet1-encoder": Task(
        "Sheet 1, task 1: Encoder_Block",
        "Two consecutive ConvBlocks followed by a max pooling layer with kernel size and stride of 2; the first "
        "ConvBlock outputs out_channels. Define the forward pass."),
    "sheet1-decoder": Task(
        "Sheet 1, task 1: Decoder_Block",
        "A transpose convolution with kernel size and stride = transpose, followed by two ConvBlocks; concatenate "
        "the skip connection inside the block (x first)."),
    "sheet1-embedding": Task(
        "Sheet 1, task 1: Embedding_Block",
        "Two linear layers with an activation in between ('sin': sine, 'GELU': GELU); the first increases the "
        "channels, the second keeps them. Define the forward pass."),
    "sheet1-final-block": Task(
        "Sheet 1, task 1: the final block of UNet (in __init__, as self.final)",
        "Conv2D (kernel 3, stride 1, padding 1) halving the channels -> GroupNorm with 8 groups -> ReLU -> Conv2D "
        "(kernel 3, stride 1, padding 1) to the image's channels."),
    "sheet1-unet-forward": Task(
        "Sheet 1, task 1: UNet.forward",
        "Define the forward pass for the class UNet, following figures 3 and 4 (the wiring is in this file's "
        "docstring)."),
    "sheet1-parameter-check": Task(
        "Sheet 1, task 1: your own check under __main__",
        "Check the network with a dummy input for both CPU/GPU and print the number of parameters that require a "
        "gradient computation."),
    "sheet1-schedule": Task(
        "Sheet 1, task 2: ddpm_schedule, the linear variance schedule",
        "Define the method ddpm_schedule in such a way that it creates beta_1, ..., beta_T as a linearly "
        "increasing variance schedule and returns the schedule as a dictionary."),
    "sheet1-algorithm1": Task(
        "Sheet 1, task 2: DDPM.forward, the training loss of Algorithm 1",
        "Define the forward pass for the class DDPM based on Algorithm 1."),
    "sheet1-algorithm2": Task(
        "Sheet 1, task 2: the sampling loop of Algorithm 2 with equation 4",
        "Fill in the missing lines inside the method sample for the class DDPM with equations 4 and 5 "
        "following Algorithm 2."),
    "sheet2-q-sample": Task(
        "Sheet 2, exercise 2.2 c): q_sample, the forward diffusion in closed form (eq. 4)",
        "Implement the forward diffusion process in the method q_sample: generate a noisy sample x_t from a "
        "sample x_0 at a timepoint t, using the equations defined above."),
    "sheet2-p-sample": Task(
        "Sheet 2, exercise 2.2 d): p_sample, one reverse step (eq. 8)",
        "Implement a single reverse step (going from x_t to x_{t-1}) in p_sample based on the equations "
        "defined above."),
    "sheet2-p-losses": Task(
        "Sheet 2, exercise 2.2 d): p_losses, the l2 and l1 noise losses (eq. 9)",
        "Implement the computation of an l2 and an l1 loss based on the noise in the method p_losses."),
    "sheet2-cosine-schedule": Task(
        "Sheet 2, exercise 2.3: cosine_beta_schedule (Nichol and Dhariwal 2021)",
        "Implement a cosine scheduler in the corresponding function cosine_beta_schedule. This schedule is "
        "described in the Paper by Nichol and Dhariwal (https://arxiv.org/abs/2102.09672)."),
    "sheet2-sigmoid-schedule": Task(
        "Sheet 2, exercise 2.3: sigmoid_beta_schedule (eq. 10)",
        "Implement a sigmoid scheduler in the corresponding function sigmoid_beta_schedule that follows the "
        "formula beta_t = beta_start + sigmoid(-s_limit + 2t/T s_limit) (beta_end - beta_start) (eq. 10)."),
    "sheet2-test-loop": Task(
        "Sheet 2, exercise 2.2 e): the test loop",
        "Implement the test loop that allows you to quantitatively assess the quality of your images. You can "
        "use the loss for a defined test set at specific time-steps as one criterion."),
    "sheet2-guidance": Task(
        "Sheet 1, eq. 5 (sheet 2, exercise 2.4): the classifier-free guided noise with a null class",
        "Form the classifier-free guided score (Algorithm 2, line 3): eps~(y_t, t, c) = (1 + w) eps(y_t, t, c) "
        "- w eps(y_t, t, c = 0), where c = 0 is the null class."),
}

class Question(NamedTuple):
    """A question of the sheets for answers.txt: where it is, the sheet's words, and our prompt where the sheet
    states a task rather than asks (empty otherwise)."""
    where: str
    text: str
    ask: str = ""


# The sheets' questions, for the students' answers.txt.
QUESTIONS: List[Question] = [
    Question("Sheet 1, question 4 (CIFAR-10)",
             "Do you need to change the capacity of the model? What hyper-parameters could improve the results?"),
    Question("Sheet 1, question 5 (guidance)",
             "What effect does the guidance weight w have on the generated images? Comment on the differences "
             "between the images generated with w1 = 0, w2 = 1, and w3 = 3. In addition, discuss how you could "
             "guide the model to generate an image conditioned on a mixture of two or more classes."),
    Question("Sheet 1, question 6 (generative diffusion)",
             "Consider our implementation. What are the disadvantages of using a Classifier-free Diffusion model? "
             "What is the main drawback of using standard generative diffusion models?"),
    Question("Sheet 2, exercise 2.2 (training)",
             "Train your network to predict the noise with different settings and compare the results (training "
             "convergence, quality of the generated images). Experiment with different parameters (learning "
             "rate, number of timesteps, ...)."),
    Question("Sheet 2, exercise 2.2 e) (test loop)",
             "Implement the test loop that allows you to quantitatively assess the quality of your images. You "
             "can use the loss for a defined test set at specific time-steps as one criterion, but you can also "
             "look deeper into possible metrics.",
             "Which criteria does your test loop report, and what do they show?"),
    Question("Sheet 2, exercise 2.3 (beta schedules)",
             "Create a plot of the different beta-schedulers for the final submission. Compare the training with "
             "these schedulers compared to the standard linear schedule. What differences can you observe?"),
    Question("Sheet 2, exercise 2.4 a) (the null token)",
             "For defining a default null token, you can experiment with a trainable vector (nn.Parameter) or a "
             "0-vector.",
             "Which did you use, and why?"),
]

# What students hand in (sheet 1, "How to report on this assignment").
HAND_IN = [
    "networks/Conditional_UNet.py (the neural network model)",
    "train_mnist.py and train_cifar10.py (the training and validating scripts)",
    "utils.py (helper functions for plotting) and ddpm.py (training and sampling of the diffusion model)",
    "every other .py file you changed",
    "log_mnist/... and log_cifar10/... (the logs of training on MNIST and on CIFAR-10)",
    "answers.txt (your answers) and this README.txt with your group members",
    "not the data folder (too large)",
]

# Paths that never go into a handout (fnmatch patterns on '/'-separated paths relative to the repository root).
RESULT_PATTERNS = ["log_*/*", "*.pth", "*.pt", "answers.txt"]
RESULTS_KEPT: List[str] = []
STAFF_ONLY = [
    "staff/*",               # the handout, the grader, its checks, the mutants and correct variants
    "tests/*",               # the reference's own suite; the students get PUBLIC_TESTS only
    "tools/*",               # one command each beyond the sheets (sampling mixtures, metrics, benchmarks, GPU)
    "lab/metrics.py", "lab/judge.py", "lab/sample_quality.py",   # 2.2 e's metrics: the open task's answer
    "classifiers/*",         # the judges of those metrics
    "docs/*",                # results, speed, the staff guide
    ".ci/*",                 # the reference's CI
]
# Tests the students get: properties of their code (shapes, statistics, the closed form against the iterated chain,
# determinism), no solution as code (tests/test_handout.py searches them for the regions' code).
PUBLIC_TESTS = ["tests/conftest.py", "tests/grading/plugin.py", "tests/test_unet.py", "tests/test_diffusion.py"]
# Files written anew into the handout: the open tasks without an answer (the sheet's instruction and a stub).
STUB_FILES: Dict[str, str] = {
    "tools/__init__.py": '"""Your command-line tools (sheet 2, exercise 2.2 f)."""\n',
    "lab/few_step.py": '''"""Few-step samplers (DDIM, DPM-Solver++): beyond the sheets, not part of the exercise.

The training loop and the grids use Algorithm 2 (DDPM.sample, sampler 'ddpm'); this module only keeps the names
the command line knows.
"""
from __future__ import annotations

SAMPLERS = ("ddpm", "ddim", "dpm++2m")
FEW_STEP_SAMPLERS = SAMPLERS[1:]
SPACINGS = ("logsnr", "time")


def sampling_timesteps(ddpm, sampler: str, steps=None, spacing: str = "logsnr") -> list:
    """The timesteps Algorithm 2 visits, T, ..., 1, 0; other samplers are not part of the exercise."""
    if sampler != "ddpm":
        raise ValueError(f"sampler {sampler!r} is not part of the exercise; use 'ddpm' (Algorithm 2)")
    if steps not in (None, ddpm.n_timesteps):
        raise ValueError(f"the DDPM sampler takes all T = {ddpm.n_timesteps} steps, got steps={steps}")
    return list(range(ddpm.n_timesteps, -1, -1))


def predict_start_from_noise(ddpm, y_t, t, noise):
    raise NotImplementedError("--clip-denoised is not part of the exercise")


def sample(*args, **kwargs):
    raise NotImplementedError("DDIM and DPM-Solver++ are not part of the exercise; use sampler 'ddpm'")
''',
    "lab/mixtures.py": '''"""Guidance towards a mixture of classes: beyond the sheets, not part of the exercise.

Sheet 1, question 5 asks how you could guide the model towards a mixture of two or more classes: answer it in
answers.txt. This module only keeps the name lab/generation.py imports.
"""


def composed_noise(ddpm, y_t, t, conditions, w, proportions):
    raise NotImplementedError("guidance towards a mixture of classes is not part of the exercise")
''',
    "tools/visualize.py": '''"""Sheet 2, exercise 2.2 f): visualisation helpers.

"Implement visualization helpers that may help you to understand the generation process along the timesteps.
Optional: Create a couple of animations that show the diffusion / generation process in an animation / gif."

Sheet 2, exercise 2.3: "Create a plot of the different beta-schedulers for the final submission."

utils.py has the plotting the training uses (grids, GIFs, loss curves, plot_schedules, save_strip); DDPM.q_sample
and DDPM.sample(keep=...) give you the states of the forward and the reverse process. Run as
python -m tools.visualize.
"""


def main() -> None:
    raise NotImplementedError("sheet 2, exercise 2.2 f: implement your visualisation helpers here")


if __name__ == "__main__":
    main()
''',
    "train_butterflies.py": '''"""Sheet 2, exercise 2.5 (optional): butterflies everywhere.

"As CIFAR10 may be boring, you can try to experiment with a Butterfly dataset from the Smithsonian Butterflies
Dataset. [...] We recommend cropping / padding to a quadratic size and then downsampling (e.g., to 128x128).
Your task: Experiment with this dataset at your own will, using unconditional / conditional generation."

The loader is given: lab.image_data.load_hf_dataset(name, channels, size, square, cache_dir) calls the sheet's
load_dataset("huggan/smithsonian_butterflies_subset", cache_dir=..., split="train") (or loads a dataset saved with
save_to_disk), crops ('crop') or pads ('pad') every photograph to a square and resizes it to size x size; with
config.dataset == "butterflies", lab.image_data.load_data uses it. The photographs have no classes. Install the
datasets library with requirements-butterflies.txt. Run as python train_butterflies.py.
"""


def main() -> None:
    raise NotImplementedError("sheet 2, exercise 2.5: your experiment with the butterflies")


if __name__ == "__main__":
    main()
''',
}
REPLACED = ("README.txt", "answers.txt")       # written anew: the students' README and the answers template
SKIPPED_DIRS = {".git", "__pycache__", ".pytest_cache", "data", "runs", "scratch", ".cache", ".devdata"}

_MARKER_RE = re.compile(r"^[ \t]*# (BEGIN|END) SOLUTION\b")
_BEGIN_RE = re.compile(r"^(?P<indent>[ \t]*)# BEGIN SOLUTION (?P<task>[a-z0-9-]+) (?P<what>\S.*?)[ \t]*$")
_END_RE = re.compile(r"^(?P<indent>[ \t]*)# END SOLUTION[ \t]*$")
STUB_WIDTH = 115


class RegionError(ValueError):
    """A solution marker is malformed, unpaired, nested, names an unknown task, or handout and reference differ."""


class Region(NamedTuple):
    """One solution region of a file: ``lines[begin]`` and ``lines[end]`` are its marker lines."""
    task: str
    what: str
    indent: str
    begin: int
    end: int


# --------------------------------------------------------------------------------------------------------------
# Regions
# --------------------------------------------------------------------------------------------------------------

def find_regions(lines: Sequence[str], path: str = "<text>") -> List[Region]:
    """The solution regions of a file given as its lines; raises RegionError for malformed or unpaired markers."""
    regions: List[Region] = []
    open_begin: Optional[int] = None
    for index, line in enumerate(lines):
        if not _MARKER_RE.match(line):
            continue
        where = f"{path}:{index + 1}"
        begin, end = _BEGIN_RE.match(line.rstrip("\r\n")), _END_RE.match(line.rstrip("\r\n"))
        if begin is None and end is None:
            raise RegionError(f"{where}: malformed marker {line.strip()!r}; expected "
                              f"'# BEGIN SOLUTION <task-id> <what>' or '# END SOLUTION'")
        if begin is not None:
            if open_begin is not None:
                raise RegionError(f"{where}: BEGIN SOLUTION inside the region opened at line {open_begin + 1}")
            open_begin = index
            continue
        if open_begin is None:
            raise RegionError(f"{where}: END SOLUTION without a BEGIN SOLUTION")
        opening = _BEGIN_RE.match(lines[open_begin].rstrip("\r\n"))
        if opening.group("indent") != end.group("indent"):
            raise RegionError(f"{where}: END SOLUTION indented differently from its BEGIN SOLUTION at line "
                              f"{open_begin + 1}")
        regions.append(Region(opening.group("task"), opening.group("what"), opening.group("indent"),
                              open_begin, index))
        open_begin = None
    if open_begin is not None:
        raise RegionError(f"{path}:{open_begin + 1}: BEGIN SOLUTION without an END SOLUTION")
    return regions


def check_tasks(regions: Iterable[Region], path: str) -> None:
    """Raise RegionError if a region names a task that TASKS does not list."""
    for region in regions:
        if region.task not in TASKS:
            raise RegionError(f"{path}:{region.begin + 1}: unknown task {region.task!r}; add it to TASKS in "
                              f"staff/handout.py (known: {', '.join(TASKS)})")


def stub_body(region: Region, newline: str = "\n") -> List[str]:
    """The lines that replace a region's code in the handout: the sheet's instruction, then the raise."""
    instruction = TASKS[region.task].instruction
    comment = textwrap.wrap(f'TODO: "{instruction}"', width=STUB_WIDTH - len(region.indent) - 2)
    lines = [f"{region.indent}# {text}{newline}" for text in comment]
    message = f"{region.task}: {region.what}".replace("\\", "\\\\").replace('"', '\\"')
    return lines + [f'{region.indent}raise NotImplementedError("{message}"){newline}']


def stub_regions(text: str, path: str = "<text>") -> str:
    """The text of a .py file with every region's code replaced by its stub (the marker lines are kept)."""
    lines = text.splitlines(keepends=True)
    regions = find_regions(lines, path)
    check_tasks(regions, path)
    for region in reversed(regions):
        newline = "\r\n" if lines[region.begin].endswith("\r\n") else "\n"
        lines[region.begin + 1:region.end] = stub_body(region, newline)
    return "".join(lines)


def fill_regions(handout_text: str, reference_text: str, path: str = "<text>",
                 tasks: Optional[Iterable[str]] = None) -> str:
    """The handout's text with the code of the reference's regions put back (only of ``tasks``, if given).

    The two files must have the same regions in the same order (task and <what> alike).
    """
    lines = handout_text.splitlines(keepends=True)
    reference_lines = reference_text.splitlines(keepends=True)
    regions, reference_regions = find_regions(lines, path), find_regions(reference_lines, path)
    found = [(r.task, r.what) for r in regions]
    expected = [(r.task, r.what) for r in reference_regions]
    if found != expected:
        raise RegionError(f"{path}: the handout's regions {found} differ from the reference's {expected}")
    wanted = None if tasks is None else set(tasks)
    for region, reference in reversed(list(zip(regions, reference_regions))):
        if wanted is None or region.task in wanted:
            lines[region.begin + 1:region.end] = reference_lines[reference.begin + 1:reference.end]
    return "".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------------------

def repository_files(repo: str, include_untracked: bool = False) -> List[str]:
    """The repository's files ('/'-separated, relative to ``repo``): what git tracks (``git ls-files``).

    With ``include_untracked`` also the untracked files git does not ignore (for a working tree not yet
    committed). Where ``repo`` is not the top of a git work tree (no .git in it: a handout, a student's copy)
    or git is missing, every file under ``repo`` except SKIPPED_DIRS and virtual environments (.venv*).
    """
    command = ["git", "-C", repo, "ls-files", "-z", "--cached"]
    if include_untracked:
        command += ["--others", "--exclude-standard"]
    paths = None
    if os.path.exists(os.path.join(repo, ".git")):
        try:
            listing = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, check=True).stdout
            paths = [p for p in listing.decode("utf-8").split("\0") if p]
        except (OSError, subprocess.CalledProcessError):
            paths = None
    if paths is None:
        paths = list(_walk_files(repo))
    return sorted({p for p in paths if os.path.isfile(os.path.join(repo, p))})


def _walk_files(repo: str) -> Iterable[str]:
    for folder, dirs, files in os.walk(repo):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS and not d.startswith(".venv"))
        for name in files:
            if not name.endswith(".pyc"):
                yield os.path.relpath(os.path.join(folder, name), repo).replace(os.sep, "/")


def is_handed_out(path: str) -> bool:
    """Whether a repository file goes into the handout: results and staff-only files do not.

    Results: log_*/ folders, *.pth/*.pt checkpoints (except classifiers/*.pt, which the grader's metrics may
    need) and answers.txt (replaced by a template). Staff only (STAFF_ONLY): staff/ (this handout maker, the
    grader and the mutants, wrong solutions quoting the reference), tests/test_handout.py (it checks the
    reference) and the tools no sheet task needs, with their tests.
    """
    def matches(patterns: Iterable[str]) -> bool:
        return any(fnmatch.fnmatch(path, pattern) for pattern in patterns)
    if path in PUBLIC_TESTS or path in STUB_FILES:
        return path in PUBLIC_TESTS
    if matches(RESULTS_KEPT):
        return True
    return not matches(RESULT_PATTERNS) and not matches(STAFF_ONLY)


def read_text(path: str) -> str:
    """A text file's content with its line endings untouched."""
    with open(path, encoding="utf-8", newline="") as handle:
        return handle.read()


def write_text(path: str, text: str) -> None:
    """Write text with its line endings untouched, creating the folders on the way."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)


def _require_empty_output(out: str) -> None:
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(f"{out} exists and is not an empty folder; choose a new --out")


def write_handout(repo: str, out: str, include_untracked: bool = False) -> List[str]:
    """Write the student version of ``repo`` to ``out`` (new or empty); returns the files written."""
    _require_empty_output(out)
    files = [path for path in repository_files(repo, include_untracked) if is_handed_out(path)]
    regions_by_file: Dict[str, List[Region]] = {}
    for path in files:
        source, target = os.path.join(repo, path), os.path.join(out, path)
        os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
        if path.endswith(".py"):
            text = read_text(source)
            regions_by_file[path] = find_regions(text.splitlines(keepends=True), path)
            stubbed = stub_regions(text, path)
            _check_compiles(stubbed, path)
            write_text(target, stubbed)
            shutil.copymode(source, target)
        else:
            shutil.copy2(source, target)
    for path, text in STUB_FILES.items():
        write_text(os.path.join(out, path), text)
    write_text(os.path.join(out, "README.txt"), student_readme(regions_by_file))
    write_text(os.path.join(out, "answers.txt"), answers_template())
    return sorted(set(files) | set(REPLACED) | set(STUB_FILES))


def _check_compiles(text: str, path: str) -> None:
    try:
        compile(text, path, "exec")
    except SyntaxError as error:
        raise RegionError(f"{path}:{error.lineno}: the stubbed file does not compile ({error.msg}); a region must "
                          f"hold whole statements") from None


def fill_handout(handout_dir: str, reference_dir: str, out: str,
                 tasks: Optional[Iterable[str]] = None) -> List[str]:
    """Copy ``handout_dir`` to ``out`` with the reference's regions (of ``tasks``, default all) put back.

    Returns the .py files that have regions. A handout file with regions needs its twin in ``reference_dir``.
    """
    _require_empty_output(out)
    filled = []
    for path in repository_files(handout_dir):
        source, target = os.path.join(handout_dir, path), os.path.join(out, path)
        os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
        if not path.endswith(".py"):
            shutil.copy2(source, target)
            continue
        text = read_text(source)
        if find_regions(text.splitlines(keepends=True), path):
            reference = os.path.join(reference_dir, path)
            if not os.path.isfile(reference):
                raise RegionError(f"{path}: has solution regions but {reference_dir} has no such file")
            text = fill_regions(text, read_text(reference), path, tasks)
            filled.append(path)
        write_text(target, text)
        shutil.copymode(source, target)
    return filled


# --------------------------------------------------------------------------------------------------------------
# The students' README and answers template
# --------------------------------------------------------------------------------------------------------------

def regions_of_repository(repo: str) -> Dict[str, List[Region]]:
    """Path -> regions, for every .py file of ``repo`` (tracked and untracked) that has regions."""
    found = {}
    for path in repository_files(repo, include_untracked=True):
        if path.endswith(".py"):
            regions = find_regions(read_text(os.path.join(repo, path)).splitlines(keepends=True), path)
            if regions:
                found[path] = regions
    return found


def student_readme(regions_by_file: Dict[str, List[Region]]) -> str:
    """README.txt of the handout: group members, the tasks and where they go, set-up, running, tests, grading."""
    task_lines = []
    for task_id, task in TASKS.items():
        places = []
        for path, regions in sorted(regions_by_file.items()):
            names = [region.what for region in regions if region.task == task_id]
            if names:
                places += textwrap.wrap(f"{path}: {'; '.join(names)}", width=104, initial_indent="      ",
                                        subsequent_indent="          ")
        if places:
            task_lines += [f"  {task_id}: {task.title}"] + places
    hand_in = [f"  - {item}" for item in HAND_IN]
    points_lines = [f"  {task_id:<24} {points:g}" for task_id, points in read_points_table().items()]
    return "\n".join([
        "Exercise: conditional DDPM with classifier-free guidance (MNIST and CIFAR-10)",
        "============================================================================",
        "",
        "Group members (name, matriculation number):",
        "  1.",
        "  2.",
        "",
        "",
        "What to implement",
        "-----------------",
        "",
        "Every place where your code goes lies between two comment lines, 'BEGIN SOLUTION <task> <what>' and",
        "'END SOLUTION'. In between you find the sheet's instruction and a line",
        "raise NotImplementedError(\"<task>: <what>\"): replace that line with your code and keep the two marker",
        "lines (the grader and the tutors use them). The docstrings around each place say what the code must do.",
        "The tasks and their places:",
        "",
        *task_lines,
        "",
        "",
        "Note the sheet's misprint: sheet 1's eq. 6 and Algorithm 1, line 6 print sqrt(alpha_t) y_0, where",
        "eqs. 2-3 give sqrt(alpha_bar_t) y_0 (as do Ho et al.). Use sqrt(alpha_bar_t) y_0: the grader does.",
        "",
        "",
        "Set-up",
        "------",
        "",
        "Python 3.8, as the sheet asks (torch 2.4.1, the last torch for Python 3.8):",
        "",
        "  python3.8 -m venv .venv && .venv/bin/pip install -r requirements-oldest.txt",
        "",
        "The current Python (3.11; torch 2.14.1):",
        "",
        "  python3 -m venv .venv && .venv/bin/pip install -r requirements.txt",
        "",
        "Run both from this folder. requirements-oldest.txt pins every package (its comment explains why); on a",
        "machine with a GPU, leave out nothing: `.venv/bin/pip install -r requirements-oldest.txt` pulls the CUDA",
        "libraries torch needs.",
        "",
        "Only for sheet 2, 2.5 (optional, the butterflies), the datasets library on top (add --no-deps on 3.8):",
        "",
        "  .venv/bin/pip install -r requirements-butterflies.txt",
        "",
        "",
        "How to run",
        "----------",
        "",
        "  .venv/bin/python networks/Conditional_UNet.py    your own check: parameter count and output shapes",
        "  .venv/bin/python train_mnist.py                 trains on MNIST with the sheet's settings (log_mnist/)",
        "  .venv/bin/python train_cifar10.py               the same for CIFAR-10, writes log_cifar10/",
        "  .venv/bin/python train_mnist.py --help          every setting (--data-root, --epochs, --subset N, ...)",
        "  .venv/bin/python -m tools.visualize             your visualisation helpers (sheet 2, 2.2 f)",
        "  .venv/bin/python train_butterflies.py           your experiment with the butterflies (sheet 2, 2.5)",
        "",
        "",
        "How to test",
        "-----------",
        "",
        "  .venv/bin/python -m pytest -q tests                     every public test",
        "  .venv/bin/python -m pytest -q tests --task sheet1-convblock   the public tests of one task",
        "",
        "The public tests check properties of your code (shapes, statistics, the closed form against the",
        "iterated chain, determinism). A test of a task you have not done yet fails with NotImplementedError",
        "naming the task. Passing them is a good sign, not a grade.",
        "",
        "",
        "How your work is graded",
        "-----------------------",
        "",
        "Each task is graded on its own, by the sheets' mathematics (with tolerances for rounding), with the",
        "tutors' checks, not with the tests here: your code for that task runs inside a correct solution of",
        "every other task, so a mistake, an exception or a syntax error in one task costs that task only",
        "(if it fails there, it is also tried inside your own project as you handed it in, and the better",
        "result counts). Keep the BEGIN/END SOLUTION lines: a task whose markers are gone is reported as such.",
        "A task's points are its points on the sheet times the share of its checks that pass:",
        "",
        *points_lines,
        "",
        "Each task's code has a time limit (a minute) and a memory limit (a few GB), and runs in a sandbox: it",
        "can write only inside its copy of your project and a private /tmp, and has no network.",
        "",
        "",
        "What to hand in",
        "---------------",
        "",
        *hand_in,
        "",
    ])


def read_points_table() -> Dict[str, float]:
    """Task id -> points, from staff/points.csv (the grader's table)."""
    import csv
    with open(os.path.join(REPO, "staff", "points.csv"), newline="", encoding="utf-8") as handle:
        return {row["task"]: float(row["points"]) for row in csv.DictReader(handle)}


def answers_template() -> str:
    """answers.txt of the handout: the sheets' questions, each with room for the answer."""
    lines = ["Answers to the questions of the two exercise sheets",
             "===================================================", ""]
    for question in QUESTIONS:
        lines += ["", question.where, "-" * len(question.where), ""]
        lines += textwrap.wrap(question.text, width=110)
        if question.ask:
            lines += ["", question.ask]
        lines += ["", "Answer:", "", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Write the student handout of this repository (--out DIR), put a reference's solutions back "
                    "into a handout (--fill HANDOUT_DIR --from REFERENCE_DIR --out DIR), or list the regions.")
    parser.add_argument("--out", metavar="DIR", help="folder to write (must not exist or be empty)")
    parser.add_argument("--from", dest="source", metavar="DIR", default=REPO,
                        help="the reference repository (default: this repository, the folder above staff/)")
    parser.add_argument("--fill", metavar="HANDOUT_DIR", help="put the regions of --from back into this handout")
    parser.add_argument("--task", action="append", metavar="TASK_ID",
                        help="with --fill: fill only this task's regions (repeatable)")
    parser.add_argument("--include-untracked", action="store_true",
                        help="also hand out untracked files that git does not ignore (default: only what git "
                             "tracks)")
    parser.add_argument("--list", action="store_true", help="list the solution regions of --from, task by task")
    return parser


def list_regions(repo: str) -> str:
    """A text table of the repository's regions, task by task, with file and line."""
    rows = []
    by_file = regions_of_repository(repo)
    for task_id in TASKS:
        places = [f"{path}:{region.begin + 1} {region.what}" for path, regions in sorted(by_file.items())
                  for region in regions if region.task == task_id]
        rows.append(f"{task_id}: {len(places)} region(s)")
        rows += [f"    {place}" for place in places]
    return "\n".join(rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.task:
        unknown = [task for task in args.task if task not in TASKS]
        if unknown or not args.fill:
            parser.error(f"--task needs --fill and known tasks ({', '.join(TASKS)})")
    try:
        if args.list:
            print(list_regions(args.source))
        elif args.fill:
            if not args.out:
                parser.error("--fill needs --out DIR")
            filled = fill_handout(args.fill, args.source, args.out, args.task)
            print(f"wrote {args.out}: the regions of {len(filled)} file(s) filled from {args.source}")
        elif args.out:
            files = write_handout(args.source, args.out, args.include_untracked)
            print(f"wrote the handout to {args.out}: {len(files)} files")
        else:
            parser.error("give --out DIR, --fill HANDOUT_DIR --out DIR, or --list")
    except (RegionError, FileExistsError) as error:
        print(f"handout.py: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
