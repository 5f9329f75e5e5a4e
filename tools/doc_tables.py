"""Write every table of docs/*.md from the committed CSVs: ``python -m tools.doc_tables [--check]``.

A table stands in its document between two marker lines, and everything between them belongs to this script:

    <!-- table: metrics log_cifar10 -->
    ...
    <!-- /table -->

The first word after ``table:`` names a function of TABLES, the rest are its arguments (a folder or a file of the
repository). Running the command rewrites the blocks in place from the CSVs present now; ``--check`` writes
nothing, names each block that differs and exits with 1 (tests/test_docs.py does the same). Nothing else in a
document is touched, so the prose around a table must not repeat its figures.

What each table reads:
  run FOLDER        FOLDER/loss.csv: epochs, train and test loss at a few epochs, seconds and images/s
  metrics FOLDER    the metric tables of the run's final checkpoint: FOLDER/<stem>_eval*.csv of the newest
                    checkpoint stem (highest epoch, then step) that has any (tools/evaluate.py writes them)
  samplers FOLDER   FOLDER/samplers/*.csv, one metric table per sampler setting (tools/samplers.py)
  study PREFIX      PREFIX_runs.csv, PREFIX_losses.csv and PREFIX_metrics.csv of a study (tools/experiments.py)
  speed FILE        a CSV written by ``python -m tools.bench --csv FILE``
"""
from __future__ import annotations

import argparse
import csv
import glob
import math
import os
import re
import sys
from typing import Callable, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENTS = "docs/*.md"
BEGIN = re.compile(r"^<!-- table: (.+?) -->$")
END = "<!-- /table -->"
CHECKPOINT_STEM = re.compile(r"^model_ep(\d+)(?:_step(\d+))?$")


def read_rows(path: str) -> list[dict]:
    with open(os.path.join(ROOT, path), newline="") as file:
        return list(csv.DictReader(file))


def number(value: str | None, digits: int) -> str:
    """A CSV cell as a fixed-point figure ('-' where empty)."""
    if value is None or value == "":
        return "-"
    return f"{float(value):.{digits}f}"


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table, padded so that it reads as a table in plain text too (text left, figures right)."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    numeric = [all(re.fullmatch(r"[-+0-9.,/ x%]*", str(row[i])) for row in rows) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(str(c).rjust(w) if right else str(c).ljust(w)
                                 for c, w, right in zip(cells, widths, numeric)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if right else "-" * (w + 2) for w, right in zip(widths, numeric)) + "|"
    return [line(header), rule] + [line(row) for row in rows]


# ----------------------------------------------------------------------------------------------------------------
# Reference runs: loss.csv and the final checkpoint's metric tables
# ----------------------------------------------------------------------------------------------------------------

def shown_epochs(last: int) -> list[int]:
    """Epochs 1, 2, 5, then every 5th (every 10th past 20 epochs), and the last."""
    every = 5 if last <= 20 else 10
    return sorted({e for e in (1, 2, 5) if e <= last} | set(range(every, last + 1, every)) | {last})


def run_table(folder: str) -> list[str]:
    rows = read_rows(f"{folder}/loss.csv")
    by_epoch = {int(row["epoch"]): row for row in rows}
    last = max(by_epoch)
    seconds = math.fsum(float(row["seconds"]) for row in rows)      # fsum: the same figure on every Python
    rates = [float(row["images_per_s"]) for row in rows]
    table = markdown(("epoch", "train loss", "test loss (EMA)", "seconds", "images/s"),
                     [(str(e), number(by_epoch[e]["train_loss"], 4), number(by_epoch[e]["test_loss"], 4),
                       number(by_epoch[e]["seconds"], 1), number(by_epoch[e]["images_per_s"], 1))
                      for e in shown_epochs(last) if e in by_epoch])
    return [f"{folder}/loss.csv: {len(rows)} epochs, the last {last}; {seconds:,.1f} s of training in the column "
            f"seconds ({seconds / 3600:.1f} h); images/s per epoch {min(rates):,.1f} to {max(rates):,.1f}, "
            f"mean {math.fsum(rates) / len(rates):,.1f}.", ""] + table


def checkpoint_order(stem: str) -> tuple[int, int]:
    match = CHECKPOINT_STEM.match(stem)
    return (int(match.group(1)), int(match.group(2) or 0)) if match else (-1, -1)


def final_checkpoint_tables(folder: str) -> tuple[str, list[str]]:
    """(stem, its metric tables): the newest checkpoint stem of ``folder`` with tables named <stem>_eval*.csv."""
    stems = {}
    for path in glob.glob(os.path.join(ROOT, folder, "model_ep*_eval*.csv")):
        name = os.path.basename(path)
        stem = name[:name.index("_eval")]
        if CHECKPOINT_STEM.match(stem):
            stems.setdefault(stem, []).append(f"{folder}/{name}")
    if not stems:
        raise FileNotFoundError(f"no metric table model_ep*_eval*.csv in {folder}")
    stem = max(stems, key=checkpoint_order)
    return stem, sorted(stems[stem])


def sampler_label(row: dict) -> str:
    """A sampler setting in words, from a metric table row's sampler, steps, spacing and eta."""
    eta = float(row.get("eta") or 0)
    if row["sampler"] == "ddpm":
        return "DDPM (Algorithm 2)"
    if row["sampler"] == "ddim":
        return "DDIM" + (f", eta = {eta:g}" if eta else "")
    name = "SDE-DPM-Solver++(2M)" if eta else "DPM-Solver++(2M)"
    return name + (", time spacing" if row.get("spacing") == "time" else "")


def metrics_table(folder: str) -> list[str]:
    stem, paths = final_checkpoint_tables(folder)
    real, rows = None, []
    for path in paths:
        for row in read_rows(path):
            if row["images"] == "real":
                real = real or row
                continue
            rows.append((os.path.basename(path)[len(stem):], sampler_label(row), row["steps"], f"{float(row['w']):g}",
                         row["weights"], row["n"], number(row["accuracy"], 3), number(row["frechet"], 3),
                         number(row["diversity"], 3)))
    rows.append(("", "real test images", "", "", "", real["n"], number(real["accuracy"], 3),
                 number(real["frechet"], 3) + " (floor)", number(real["diversity"], 3)))
    header = ("table (" + stem + "...)", "sampler", "steps", "w", "weights", "n", "accuracy", "Frechet", "diversity")
    return [f"Final checkpoint: {folder}/{stem}.pth; its metric tables: {folder}/{stem}_eval*.csv.", ""] + \
        markdown(header, rows)


# ----------------------------------------------------------------------------------------------------------------
# Sampler studies and training studies
# ----------------------------------------------------------------------------------------------------------------

SAMPLER_ORDER = {"ddpm": 0, "ddim": 1, "dpm++2m": 2}


def per_weight(rows: list[dict], weights: list[float], key: str, digits: int) -> str:
    by_w = {float(row["w"]): row for row in rows}
    return " / ".join(number(by_w[w][key], digits) if w in by_w else "-" for w in weights)


def standard_error_of_difference(accuracy_a: float, n_a: int, accuracy_b: float, n_b: int) -> float:
    """Standard error of the difference of two class accuracies measured on n_a and n_b independent images:
    sqrt(p_a (1 - p_a) / n_a + p_b (1 - p_b) / n_b) (binomial)."""
    return math.sqrt(accuracy_a * (1 - accuracy_a) / n_a + accuracy_b * (1 - accuracy_b) / n_b)


def gap_to_reference(rows: list[dict], reference: list[dict], weights: list[float]) -> str:
    """Per weight: accuracy minus the reference's accuracy, in points, with the standard error of that
    difference ('-' where either lacks the weight)."""
    mine, theirs = ({float(row["w"]): row for row in table} for table in (rows, reference))
    cells = []
    for w in weights:
        if w not in mine or w not in theirs:
            cells.append("-")
            continue
        a, b = mine[w], theirs[w]
        pa, na, pb, nb = float(a["accuracy"]), int(a["n"]), float(b["accuracy"]), int(b["n"])
        cells.append(f"{100 * (pa - pb):+.1f} ± {100 * standard_error_of_difference(pa, na, pb, nb):.1f}")
    return " / ".join(cells)


def samplers_table(folder: str) -> list[str]:
    settings = []
    for path in sorted(glob.glob(os.path.join(ROOT, folder, "samplers", "*.csv"))):
        if os.path.basename(path) == "samplers.csv":                       # the study's summary of the others
            continue
        rows = read_rows(os.path.relpath(path, ROOT))
        named_eta = re.search(r"_eta([0-9.]+)", os.path.basename(path))     # tables older than the eta column
        for row in rows:
            if not row.get("eta") and named_eta:
                row["eta"] = named_eta.group(1)
        settings.append((os.path.relpath(path, ROOT), [r for r in rows if r["images"] == "generated"],
                         next(r for r in rows if r["images"] == "real")))
    weights = sorted({float(r["w"]) for _, rows, _ in settings for r in rows})

    def order(setting):
        first = setting[1][0]
        return (SAMPLER_ORDER[first["sampler"]], float(first.get("eta") or 0), first.get("spacing") == "time",
                int(first["steps"]))

    settings.sort(key=order)
    reference = settings[0][1] if settings[0][1][0]["sampler"] == "ddpm" else None
    ws = " / ".join(f"{w:g}" for w in weights)
    table = []
    for path, rows, _ in settings:
        steps = int(rows[0]["steps"])
        calls = f"{steps} / {2 * steps}"
        gap = "" if reference is None or rows is reference else gap_to_reference(rows, reference, weights)
        table.append((sampler_label(rows[0]), str(steps), calls, per_weight(rows, weights, "n", 0),
                      per_weight(rows, weights, "accuracy", 3), gap, per_weight(rows, weights, "frechet", 3),
                      per_weight(rows, weights, "diversity", 2), os.path.basename(path)))
    real = settings[0][2]
    table.append(("real test images", "", "", real["n"], number(real["accuracy"], 3), "",
                  number(real["frechet"], 3) + " (floor)", number(real["diversity"], 2), ""))
    header = ("sampler", "steps", "calls w=0 / w>0", f"images w = {ws}", f"accuracy w = {ws}",
              "accuracy - DDPM, points ± s.e.", f"Frechet w = {ws}", f"diversity w = {ws}",
              f"file in {folder}/samplers/")
    return markdown(header, table)


def study_table(prefix: str) -> list[str]:
    runs = {row["run"]: row for row in read_rows(f"{prefix}_runs.csv")}
    final = {}
    for row in read_rows(f"{prefix}_losses.csv"):
        if row["run"] not in final or int(row["epoch"]) > int(final[row["run"]]["epoch"]):
            final[row["run"]] = row
    metrics = {}
    for row in read_rows(f"{prefix}_metrics.csv"):
        if row["images"] == "generated":
            name = row["run"] + (":raw" if row["weights"] == "raw" else "")
            metrics.setdefault(name, []).append(row)
    real = next(row for row in read_rows(f"{prefix}_metrics.csv") if row["images"] == "real")
    weights = sorted({float(r["w"]) for rows in metrics.values() for r in rows})
    ws = " / ".join(f"{w:g}" for w in weights)
    table = []
    for name, rows in metrics.items():
        run = runs[name.split(":")[0]]
        raw = name.endswith(":raw")
        table.append((name.split(":")[0] + (", raw weights (EMA off)" if raw else ""),
                      "same training" if raw else run["changes"],
                      "" if raw else f"{int(run['parameters']):,}", "" if raw else f"{int(run['images_seen']):,}",
                      "" if raw else number(run["train_seconds"], 1),
                      "" if raw else number(run["seconds_per_1000_images"], 2),
                      number(final[name]["train_loss"], 4), number(final[name]["test_loss"], 4),
                      per_weight(rows, weights, "accuracy", 2), per_weight(rows, weights, "frechet", 2),
                      number(next(r for r in rows if float(r["w"]) == weights[-1])["diversity"], 2)))
    table.append(("real test images", "", "", "", "", "", "", "", number(real["accuracy"], 3),
                  number(real["frechet"], 2) + " (floor)", number(real["diversity"], 2)))
    header = ("run", "changes", "parameters", "images", "train s", "s / 1000 img", "train loss", "test loss",
              f"accuracy w = {ws}", f"Frechet w = {ws}", f"diversity w = {weights[-1]:g}")
    return markdown(header, table)


# ----------------------------------------------------------------------------------------------------------------
# Speed: the CSVs of python -m tools.bench --csv
# ----------------------------------------------------------------------------------------------------------------

SPEED_COLUMNS = (("train_img_s", "train img/s", 1), ("step_s", "s/step", 2), ("train_warmup_s", "warm-up s: train", 1),
                 ("sample_warmup_s", "warm-up s: sample", 1), ("activations_mib", "activations MiB", 0),
                 ("cuda_peak_mib", "CUDA peak MiB", 0), ("ddpm400_img_s", "DDPM-400 img/s", 2),
                 ("ddim50_img_s", "DDIM-50 img/s", 2), ("dpm++2m20_img_s", "dpm++2m-20 img/s", 2))
CONFIG_NAMES = {"mnist": "MNIST F=32", "cifar10": "CIFAR-10 F=32", "cifar10-f64": "CIFAR-10 F=64",
                "butterflies-64": "butterflies 64 px", "butterflies-128": "butterflies 128 px"}


def speed_table(path: str) -> list[str]:
    rows = read_rows(path)
    shown = [(key, title, digits) for key, title, digits in SPEED_COLUMNS if any(row.get(key) for row in rows)]
    first = rows[0]
    device = "" if first["device"] in first["machine"] else f"; {first['device']}"
    lines = [f"{first['machine']}{device}. `{first['command']}` (sampling: w = {float(first['guidance']):g}, "
             f"{first['timing']}).", ""]
    table = []
    for config in dict.fromkeys(row["config"] for row in rows):
        ours = [row for row in rows if row["config"] == config]
        plain = next((row for row in ours if row["path"] == "plain"), None)
        evaluated = [row for row in ours if not row.get("batch_size")]                # tools/evaluate.py-style rows
        evaluate = next((row for row in evaluated if row["path"].endswith(" 250 per call")),
                        evaluated[0] if evaluated else None)
        for i, row in enumerate(ours):
            ratio, reference = "", plain if row.get("batch_size") else evaluate
            if reference is not None and row is not reference:
                ratio = " / ".join(f"{float(row[k]) / float(reference[k]):.2f}x" if row.get(k) and reference.get(k)
                                   else "-" for k in ("train_img_s", "ddpm400_img_s"))
            table.append((CONFIG_NAMES.get(config, config) if i == 0 else "", row["path"], row.get("batch_size", ""))
                         + tuple(number(row.get(key), digits) for key, _, digits in shown) + (ratio,))
    header = ("config", "path", "batch") + tuple(title for _, title, _ in shown) + \
        ("x plain: train / DDPM-400",)
    return lines + markdown(header, table)


RULE_TITLES = {"train_channels_last": "channels_last, training", "sample_channels_last": "channels_last, sampling",
               "bf16_autocast": "bf16 autocast", "fused_adam": "fused Adam", "foreach_adam": "foreach Adam",
               "cudnn_benchmark": "cudnn.benchmark", "fold_batchnorm": "BatchNorm folding",
               "share_encoder": "shared encoder", "compile_training": "compile, training",
               "compile_sampling": "compile, sampling"}


def rule_choice(rule, field: str) -> str:
    """What lab/speed.py's rule of a machine class does with one FastPath field."""
    if field == "compile_training":
        limit = rule.compile_training_from
        return f"from {limit:,} training images" if limit is not None else "only with --compile"
    if field == "compile_sampling":
        limit = rule.compile_sampling_from
        return f"from {limit:,} image-steps" if limit is not None else "only with --compile"
    if field == "train_channels_last" and rule.path.train_channels_last and not rule.train_channels_last_grey:
        return "on (3-channel images)"
    return "on" if getattr(rule.path, field) else "off"


def rules_table(argument: str) -> list[str]:
    """The rule of each machine class (lab/speed.py's RULES) beside what the full benchmark of that class measured:
    each ingredient alone against the plain path, in the phase it speeds up (tools.bench.ingredient_ratios), the
    run length after which compiling the default path repays it (tools.bench.compile_break_even), and the images
    per sampling call against 250. ``argument``: the benchmark CSVs, one per machine class."""
    from lab.speed import PLAIN_SAMPLE_CHUNK, RULES
    from tools.bench import INGREDIENTS, compile_break_even, ingredient_ratios
    lines, table = [], []
    for path in argument.split():
        rows = read_rows(path)
        first, rule = rows[0], RULES[rows[0]["machine_class"]]
        configs = list(dict.fromkeys(row["config"] for row in rows))
        names = " / ".join(CONFIG_NAMES.get(config, config) for config in configs)
        lines.append(f"- {first['machine_class']}: {first['machine']}; {first['device']}; `{first['command']}` "
                     f"({names})")
        ratios, break_even = ingredient_ratios(rows), compile_break_even(rows)
        shown = []
        for field in (field for fields in INGREDIENTS.values() for field in fields if field in ratios):
            phase = {"compile_training": "training", "compile_sampling": "sampling"}.get(field)
            repaid = "" if phase is None else " / ".join(
                "-" if break_even[phase].get(config) is None else f"{break_even[phase][config]:,.0f}"
                for config in configs)
            shown.append((RULE_TITLES[field], " / ".join(
                f"{ratios[field][config]:.2f}x" if config in ratios[field] else "-" for config in configs),
                repaid, rule_choice(rule, field)))
        evaluation = [row for row in rows if not row.get("batch_size")]
        for chunk in sorted({int(row["path"].split()[-3]) for row in evaluation}):
            measured = []
            for config in configs:
                ours = {int(row["path"].split()[-3]): float(row["ddpm400_img_s"])
                        for row in evaluation if row["config"] == config}
                measured.append(f"{ours[chunk] / ours[PLAIN_SAMPLE_CHUNK]:.2f}x" if chunk in ours else "-")
            shown.append((f"{chunk} images per sampling call", " / ".join(measured), "",
                          "chosen" if chunk == rule.path.sample_chunk else ""))
        table += [((first["machine_class"] if i == 0 else ""),) + row for i, row in enumerate(shown)]
    header = ("machine class", "ingredient", "alone, x plain (sampling calls: x 250 per call)",
              "compiling repaid after", "rule")
    return lines + [""] + markdown(header, table)


TABLES: dict[str, Callable[[str], list[str]]] = {
    "run": run_table, "metrics": metrics_table, "samplers": samplers_table, "study": study_table,
    "speed": speed_table, "rules": rules_table,
}


def render(spec: str) -> list[str]:
    name, _, argument = spec.partition(" ")
    if name not in TABLES:
        raise ValueError(f"unknown table {name!r} (known: {', '.join(TABLES)})")
    return TABLES[name](argument.strip())


def regenerate(text: str, where: str = "document") -> str:
    """``text`` with every marked block rewritten from the CSVs."""
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        out.append(lines[i])
        match = BEGIN.match(lines[i])
        i += 1
        if not match:
            continue
        end = next((j for j in range(i, len(lines)) if lines[j] == END), None)
        if end is None:
            raise ValueError(f"{where}: the table {match.group(1)!r} has no closing {END}")
        out += render(match.group(1)) + [END]
        i = end + 1
    return "\n".join(out)


def documents() -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, DOCUMENTS)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a document's tables differ "
                        "from what the CSVs give now")
    args = parser.parse_args(argv)
    stale = []
    for path in documents():
        with open(os.path.join(ROOT, path)) as file:
            text = file.read()
        fresh = regenerate(text, path)
        if fresh != text:
            stale.append(path)
            if not args.check:
                with open(os.path.join(ROOT, path), "w") as file:
                    file.write(fresh)
    verb = "differ from the CSVs (run python -m tools.doc_tables)" if args.check else "rewritten"
    print(f"{len(stale)} of {len(documents())} documents {verb}" + (": " + ", ".join(stale) if stale else ""))
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
