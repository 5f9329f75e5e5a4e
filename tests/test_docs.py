"""The documents: every table of docs/*.md is what tools/doc_tables.py writes from the committed CSVs now, the
tables follow a run's final checkpoint, and no document names a place outside the repository."""
import os
import re

import pytest

from tools import doc_tables

ROOT = doc_tables.ROOT
DOCUMENTS = ["README.txt", "answers.txt"] + doc_tables.documents()


def read(path):
    with open(os.path.join(ROOT, path)) as file:
        return file.read()


@pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, "log_mnist", "loss.csv")),
                    reason="the reference runs' CSVs are not here (a copy without results, e.g. the handout)")
@pytest.mark.parametrize("path", doc_tables.documents())
def test_each_table_of_a_document_is_what_the_script_writes_from_the_csvs(path):
    text = read(path)
    assert text == doc_tables.regenerate(text, path), f"{path} is stale: run python -m tools.doc_tables"


def test_the_tables_fill_only_their_marked_blocks():
    text = "before\n<!-- table: speed FILE -->\nold\n<!-- /table -->\nafter"
    rendered = {"speed": lambda argument: [f"new {argument}"]}
    original, doc_tables.TABLES = doc_tables.TABLES, rendered
    try:
        assert doc_tables.regenerate(text) == "before\n<!-- table: speed FILE -->\nnew FILE\n<!-- /table -->\nafter"
        with pytest.raises(ValueError, match="no closing"):
            doc_tables.regenerate("<!-- table: speed FILE -->\nold")
        with pytest.raises(ValueError, match="unknown table"):
            doc_tables.regenerate("<!-- table: nonsense x -->\n<!-- /table -->")
    finally:
        doc_tables.TABLES = original


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as file:
        file.write(text)


METRIC_HEADER = "images,weights,w,sampler,steps,spacing,eta,clip,chunk,n,accuracy,frechet,diversity,real_diversity\n"
REAL_ROW = "real,,,,,,,,,10000,0.7,0.17,3.8,3.8\n"


def test_a_runs_tables_are_those_of_its_newest_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(doc_tables, "ROOT", str(tmp_path))
    write(str(tmp_path / "run" / "model_ep34_step1_eval.csv"),
          METRIC_HEADER + REAL_ROW + "generated,ema,3.0,ddpm,400,,,no,,500,0.896,1.8,2.9,3.8\n")
    write(str(tmp_path / "run" / "model_ep40_eval_dpm++2m20_eta1_w0-1-3_n50.csv"),
          METRIC_HEADER + REAL_ROW + "generated,ema,0.0,dpm++2m,20,logsnr,1.0,no,500,500,0.42,1.4,3.3,3.8\n")
    write(str(tmp_path / "run" / "model_ep9_eval.csv"),
          METRIC_HEADER + REAL_ROW + "generated,ema,3.0,ddpm,400,,,no,,500,0.5,3.0,2.9,3.8\n")
    table = "\n".join(doc_tables.render("metrics run"))
    assert "run/model_ep40.pth" in table and "SDE-DPM-Solver++(2M)" in table and "0.420" in table
    assert "0.896" not in table and "0.500" not in table


def test_a_loss_table_reads_its_epochs_and_seconds(tmp_path, monkeypatch):
    monkeypatch.setattr(doc_tables, "ROOT", str(tmp_path))
    rows = "".join(f"{e},{1 / e:.4f},{2 / e:.4f},10.0,{100 * e}\n" for e in range(1, 41))
    write(str(tmp_path / "run" / "loss.csv"), "epoch,train_loss,test_loss,seconds,images_per_s\n" + rows)
    lines = doc_tables.render("run run")
    assert lines[0].startswith("run/loss.csv: 40 epochs, the last 40; 400.0 s")
    assert [line.split("|")[1].strip() for line in lines[4:]] == ["1", "2", "5", "10", "20", "30", "40"]


def test_the_benchmarks_csv_is_what_the_speed_tables_read(tmp_path, monkeypatch):
    bench = pytest.importorskip("tools.bench", reason="a copy without the benchmark (the student handout)")
    result = {"machine": "Some CPU (AVX2, no native bf16), torch 2.x", "machine_class": "cpu-avx2",
              "device": "Some CPU CPU, 2 threads", "config": "mnist", "n_features": 32, "guidance": 1.0,
              "fast_path": {"plain": "", "fast": ""}, "train_img_s": {128: {"plain": 50.0, "fast": 100.0}},
              "train_warmup_s": {128: {"plain": 4.0, "fast": 61.5}}, "sample_warmup_s": {"plain": 0.5, "fast": 20.25},
              "step_memory_mib": {128: {"plain": {"activations": 300.0, "state": 13.7},
                                        "fast": {"activations": 160.0, "state": 13.7}}},
              "sample_img_s": {"ddpm400": {"plain": 0.25, "fast": 0.5}, "ddim50": {"plain": 2.0, "fast": 4.0},
                               "dpm++2m20": {"plain": 5.0, "fast": 10.0}, "ddim20": {"plain": 5.0, "fast": 10.0}},
              "evaluate_ddpm400_img_s": {"250 per call": 0.4, "80 per call": 0.6}}
    rows = bench.csv_rows(result, "python -m tools.bench --quick", complete=False, timed_steps=8)
    assert all(set(row) <= set(bench.CSV_COLUMNS) for row in rows)
    from utils import write_rows_csv
    write_rows_csv(rows, str(tmp_path / "speed.csv"), bench.CSV_COLUMNS)
    monkeypatch.setattr(doc_tables, "ROOT", str(tmp_path))
    table = "\n".join(doc_tables.render("speed speed.csv"))
    assert "`python -m tools.bench --quick`" in table and "8 steps timed, scaled" in table
    assert "2.00x / 2.00x" in table and "- / 1.50x" in table             # fast vs plain; 80 vs 250 per call
    assert "| s/step" in table and "| activations MiB" in table and "2.56" in table and "160" in table
    assert "| warm-up s: train" in table and "61.5" in table and "20.2" in table          # compiling, mostly
    result["fast_path"]["shared encoder only"] = "shared encoder"         # timed in sampling only
    result["sample_warmup_s"]["shared encoder only"] = 0.625
    for rates in result["sample_img_s"].values():
        rates["shared encoder only"] = rates["plain"] * 1.25
    rows = bench.csv_rows(result, "python -m tools.bench --quick", complete=False, timed_steps=8)
    assert rows[2]["path"] == "shared encoder only" and rows[2]["ddpm400_img_s"] == 0.31
    assert "train_img_s" not in rows[2] and "activations_mib" not in rows[2]
    write_rows_csv(rows, str(tmp_path / "speed.csv"), bench.CSV_COLUMNS)
    line = next(line for line in doc_tables.render("speed speed.csv") if "shared encoder only" in line)
    assert [cell.strip() for cell in line.split("|")][4] == "-" and "- / 1.24x" in line


@pytest.mark.parametrize("path", DOCUMENTS)
def test_documents_name_no_place_outside_the_repository(path):
    text = read(path)
    for pattern in (r"\.\./", r"/work/", r"this machine", r"shared/(data|seeds)"):
        assert not re.search(pattern, text), f"{path} names {pattern!r}"


def test_the_readme_is_short():
    assert len(read("README.txt").encode()) <= 12_000


def test_accuracy_gaps_carry_the_binomial_standard_error_of_a_difference():
    # sqrt(0.5 * 0.5 / 1000 + 0.8 * 0.2 / 500) = sqrt(0.00025 + 0.00032) = 0.023875
    assert doc_tables.standard_error_of_difference(0.5, 1000, 0.8, 500) == pytest.approx(0.0238747, rel=1e-5)
    reference = [{"w": "0.0", "accuracy": "0.5", "n": "1000"}, {"w": "3.0", "accuracy": "0.9", "n": "500"}]
    rows = [{"w": "0.0", "accuracy": "0.47", "n": "1000"}]
    assert doc_tables.gap_to_reference(rows, reference, [0.0, 3.0]) == "-3.0 ± 2.2 / -"
