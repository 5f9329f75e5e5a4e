"""A class of known submissions, to try the grader on and to time it: every mutant and correct variant of
staff/mutants/ (the reference with one replacement), then copies of the reference and of the handout up to
``--size``, every third submission (by name) zipped with its project in a folder.

    python -m staff.demo_class OUT [--size 50]
    python -m staff.grade --class OUT --out REPORTS_DIR --no-reuse

Graded, the references and variants get full marks, the handouts 0 and every mutant loses its own task only
(tests/test_handout.py checks each of them). Standard library only; Python 3.8.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import zipfile
from typing import List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):
    sys.path.insert(0, REPO)

from staff import grade, handout  # noqa: E402

MUTANTS = os.path.join(REPO, "staff", "mutants")
HANDOUT_SHARE = 5                    # one submission in five (of those beyond the mutants and variants) a handout


def copy_reference(target: str) -> None:
    shutil.copytree(REPO, target, ignore=shutil.ignore_patterns(*grade.COPY_IGNORE, "staff"))


def zip_folder(folder: str) -> None:
    """Replace ``folder`` by ``folder``.zip holding it as one top folder (as a student's zip often does)."""
    with zipfile.ZipFile(folder + ".zip", "w", zipfile.ZIP_DEFLATED) as archive:
        for current, dirs, files in os.walk(folder):
            dirs.sort()
            for name in sorted(files):
                path = os.path.join(current, name)
                archive.write(path, os.path.join(os.path.basename(folder), os.path.relpath(path, folder)))
    shutil.rmtree(folder)


def make_class(out: str, size: int = 50) -> List[str]:
    """Write the class into ``out`` (new or empty); returns the submissions' file names."""
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(f"{out} exists and is not an empty folder; choose a new one")
    items = []
    for kind in ("mutant", "variant"):
        with open(os.path.join(MUTANTS, f"{kind}s.json"), encoding="utf-8") as handle:
            items += [(f"{kind}-{item['name']}", item) for item in json.load(handle)]
    if size < len(items) + 2:
        raise ValueError(f"--size must be at least {len(items) + 2} (the {len(items)} mutants and variants, a "
                         f"reference and a handout), got {size}")
    os.makedirs(out, exist_ok=True)
    folders = []
    for name, item in items:
        folder = os.path.join(out, name)
        copy_reference(folder)
        path = os.path.join(folder, item["file"])
        text = handout.read_text(path)
        if text.count(item["old"]) != 1:
            raise ValueError(f"{name}: its old text must occur once in {item['file']}")
        handout.write_text(path, text.replace(item["old"], item["new"]))
        folders.append(folder)
    rest = size - len(items)
    handouts = max(1, rest // HANDOUT_SHARE)
    with tempfile.TemporaryDirectory() as scratch:
        student_copy = os.path.join(scratch, "handout")
        handout.write_handout(REPO, student_copy, include_untracked=True)
        for index in range(handouts):
            folders.append(os.path.join(out, f"handout-{index:02d}"))
            shutil.copytree(student_copy, folders[-1])
    for index in range(rest - handouts):
        folders.append(os.path.join(out, f"reference-{index:02d}"))
        copy_reference(folders[-1])
    for index, folder in enumerate(sorted(folders)):
        if index % 3 == 0:
            zip_folder(folder)
    return sorted(os.listdir(out))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Write a class of known submissions (mutants, correct variants, "
                                                 "references, handouts; every third zipped) to try the grader on.")
    parser.add_argument("out", metavar="OUT", help="folder to write (must not exist or be empty)")
    parser.add_argument("--size", type=int, default=50, help="number of submissions (default 50)")
    args = parser.parse_args(argv)
    try:
        names = make_class(args.out, args.size)
    except (FileExistsError, ValueError) as error:
        print(f"demo_class.py: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {len(names)} submissions to {args.out} ({sum(n.endswith('.zip') for n in names)} zipped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
