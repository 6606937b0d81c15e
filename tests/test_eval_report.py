"""eval.report: report.md's table parsed back, the plots opened, atomic writes, the main table."""

from __future__ import annotations

import os

import pytest
from matplotlib import image

from eval_helpers import family_records, record
from greencode_jax.eval.report import COLUMNS, PARETO_MARK, format_table, main_table, write_report
from greencode_jax.eval.summary import summarize

HEADER = {"model": "tiny-llama", "device": "NVIDIA H200", "energy_method": "counter (NVML total energy)",
          "samples": 4}


def tables(text: str) -> list[list[dict]]:
    """Every markdown table of `text` as a list of {column: cell} rows."""
    out, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("| policy |"):
            head = [c.strip() for c in line.strip("|").split(" | ")]
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                rows.append(dict(zip(head, [c.strip() for c in row.strip().strip("|").split(" | ")])))
            out.append(rows)
    return out


def mean_of(cell: str) -> float:
    return float(cell.split(" ± ")[0])


@pytest.fixture(scope="module")
def dominated_records():
    """Two protocols; in completion the confidence row costs as much as learned@0.9 for less ROUGE-L."""
    records = family_records(n=5) + family_records(n=4, protocol="line")
    for r in records:
        if r["family"] == "confidence" and r["protocol"] == "completion":
            r["energy"]["modelled"]["joules"] = 7.0
    return records


@pytest.fixture(scope="module")
def written(tmp_path_factory, dominated_records):
    """(summary, paths) of one report written into a fresh directory."""
    summary = summarize(dominated_records)
    out = tmp_path_factory.mktemp("report") / "out"
    return summary, write_report(out, summary, dominated_records, header=HEADER)


def test_report_table_matches_the_summary(written):
    summary, paths = written
    assert sorted(os.listdir(paths["report"].parent)) == ["exits.png", "pareto.png", "report.md"]  # no temp files
    text = paths["report"].read_text()
    first = text.splitlines()[:5]
    assert "Hardware: NVIDIA H200" in first[2] and "Energy method: counter (NVML total energy)" in first[3]
    assert "Only estimates" not in text
    completion, line = tables(text)
    assert list(completion[0]) == list(COLUMNS)
    policies = summary["protocols"]["completion"]["policies"]
    assert len(completion) == len(policies)
    for row in completion:
        marked = row["policy"].endswith(PARETO_MARK)
        key = row["policy"].removesuffix(f" {PARETO_MARK}")
        p = policies[key]
        assert marked == p["pareto"]
        assert mean_of(row["ROUGE-L"]) == pytest.approx(p["metrics"]["rouge_l"]["mean"], abs=5e-4)
        half = float(row["ROUGE-L"].split(" ± ")[1])
        assert half == pytest.approx((p["metrics"]["rouge_l"]["high"] - p["metrics"]["rouge_l"]["low"]) / 2,
                                     abs=5e-4)
        assert mean_of(row["J (modelled)"]) == pytest.approx(p["energy"]["modelled"]["mean"], rel=5e-3)
        assert mean_of(row["J (measured)"]) == pytest.approx(p["energy"]["measured"]["mean"], rel=5e-3)
        assert float(row["saved % (modelled)"]) == pytest.approx(p["saved_vs_full"]["modelled"], abs=0.05)
        assert float(row["ΔROUGE-L %"]) == pytest.approx(p["quality_change_vs_full"], abs=0.05)
    assert {r["policy"] for r in completion if not r["policy"].endswith(PARETO_MARK)} == \
        {"confidence:softmax_max@0.9"}
    assert len(line) == len(summary["protocols"]["line"]["policies"])
    assert "- J (measured) method: counter" in text and "- J (modelled) method: measured" in text


def test_plots_are_pngs_that_open(written):
    _, paths = written
    for name in ("pareto", "exits"):
        pixels = image.imread(paths[name])
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
        assert pixels[..., :3].std() > 0.01  # something was drawn


def test_only_estimates_is_said_in_the_first_lines(tmp_path):
    records = [record(s, "full", "full", None, rouge_l=0.5, measured=3.0, measured_method="estimated",
                      modelled_method="estimated") for s in range(3)]
    records += [record(s, "fixed:3", "fixed", 3, rouge_l=0.2, measured=None, measured_method="unavailable",
                       measured_reason="no counter", modelled_method="estimated") for s in range(3)]
    paths = write_report(tmp_path, summarize(records), records, header={"device": "cpu", "energy_method": "estimated"})
    lines = paths["report"].read_text().splitlines()
    assert lines[4].startswith("- **Only estimates exist here**") and "labelled estimated" in lines[4]
    (table,) = tables("\n".join(lines))
    fixed = next(r for r in table if r["policy"].startswith("fixed:3"))
    assert fixed["J (measured)"] == "n/a" and fixed["saved % (measured)"] == "n/a"  # never 0
    assert "- fixed:3: J (measured) n/a: no counter" in lines


def test_a_failure_while_rendering_writes_nothing(tmp_path):
    records = family_records(n=2)
    summary = summarize(records)
    records[0]["exit_layers"] = ["not a layer"]
    with pytest.raises(ValueError):
        write_report(tmp_path / "out", summary, records, header=HEADER)
    assert not (tmp_path / "out").exists()


def test_rewriting_replaces_the_files_and_leaves_no_temporary(tmp_path):
    records = [record(s, "full", "full", None, rouge_l=0.5) for s in range(2)]
    summary = summarize(records)
    write_report(tmp_path, summary, records, header=HEADER)
    write_report(tmp_path, summary, records, header={**HEADER, "device": "other"})
    assert sorted(os.listdir(tmp_path)) == ["exits.png", "pareto.png", "report.md"]
    assert "Hardware: other" in (tmp_path / "report.md").read_text()


def test_main_table_picks_the_best_saving_setting_of_each_family():
    records = family_records(n=3)
    # a fixed exit with the best ROUGE-L that saves nothing must not be picked
    records += [record(s, "fixed:7", "fixed", 7, rouge_l=0.6, modelled=8.0, exits=[7] * 15) for s in range(3)]
    rows = main_table(summarize(records), "completion")
    assert [r["policy"] for r in rows] == ["full", "fixed:5", "confidence:softmax_max@0.9", "learned@0.6",
                                          "learned@0.9"]
    assert rows[1]["note"] == "best fixed" and rows[2]["note"] == "best confidence"
    assert rows[1]["saved_modelled"] == pytest.approx(25.0) and rows[1]["rouge_l"] == pytest.approx(0.5)
    text = format_table(rows)
    lines = text.splitlines()
    assert len(lines) == 1 + len(rows) and lines[0].startswith("policy")
    assert "fixed:5" in lines[2] and "+25.0" in lines[2] and "-16.7" in lines[2]


def test_main_table_shows_the_certified_confidence_row_even_when_another_is_best():
    records = family_records(n=3)
    # certified at a conservative threshold: saves less than the family's best, still a headline row
    records += [record(s, "confidence@certified", "confidence", 0.99, rouge_l=0.55, modelled=7.5, exits=[7] * 15)
                for s in range(3)]
    rows = main_table(summarize(records), "completion")
    policies = [r["policy"] for r in rows]
    assert policies == ["full", "fixed:5", "confidence:softmax_max@0.9", "confidence@certified", "learned@0.6",
                        "learned@0.9"]
    assert rows[3]["note"] is None and rows[3]["saved_modelled"] == pytest.approx(100 * (8.0 - 7.5) / 8.0)


def test_main_table_when_nothing_saves_energy_says_so():
    records = [record(s, "full", "full", None, rouge_l=0.6, modelled=8.0) for s in range(3)]
    records += [record(s, "fixed:7", "fixed", 7, rouge_l=0.6, modelled=9.0) for s in range(3)]
    rows = main_table(summarize(records), "completion")
    assert rows[1]["policy"] == "fixed:7" and rows[1]["note"] == "saves nothing"


def test_an_empty_summary_still_gives_a_report(tmp_path):
    paths = write_report(tmp_path, summarize([]), [], header={"device": "cpu", "energy_method": "estimated"})
    assert "No records were summarised." in paths["report"].read_text()
    assert image.imread(paths["pareto"]).ndim == 3
    with pytest.raises(ValueError, match="protocol 'line' is not in the summary"):
        main_table(summarize([]), "line")
