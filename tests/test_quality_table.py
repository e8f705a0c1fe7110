"""The results-table writers of ``benchmarks/`` (pure pieces; no runs)."""

import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_benchmark(name: str):
    if str(REPO / "benchmarks") not in sys.path:
        sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_quality():
    return load_benchmark("quality")


def fake_result(ppl: float) -> dict:
    return {
        "perplexity": {"wikitext2": {"perplexity": ppl}, "ptb": {"perplexity": 2 * ppl}},
        "bits_per_weight": 4.03,
        "wall_seconds": {"quantize": 12.0},
        "memory": {"cpu_peak_rss_gib": 1.5},
    }


def test_error_line_prefers_the_exception_over_hydras_hint():
    q = load_benchmark("cells")
    log = (
        "Error executing job with overrides: [...]\nTraceback ...\nValueError: block 0 q_proj: w_group_size=128 "
        "does not divide the input width 576\nSet the environment variable HYDRA_FULL_ERROR=1 for a complete trace."
    )
    assert q.error_line(log) == "ValueError: block 0 q_proj: w_group_size=128 does not divide the input width 576"
    assert q.error_line("just a last line\n") == "just a last line"


def test_table_fills_values_and_numbers_the_reasons_for_empty_cells():
    q = load_quality()
    grid = {
        ("fp", "fp"): fake_result(10.0),
        ("rtn", "w4a16"): fake_result(12.5),
        ("rtn", "w4a16g128"): "failed after 9 s: RuntimeError: out of memory",
        ("smoothquant", "w4a16"): q.skip_reason("smoothquant", "w4a16"),
    }
    text = q.table("m", grid, ["w4a16", "w4a16g128"], "cpu")
    assert "| rtn | 12.50 | failed [1] |" in text and "| rtn | 25.00 | failed [1] |" in text
    assert "| smoothquant | n/a [2] | n/a [2] |" not in text  # w4a16g128 is not in the grid: not run yet
    assert "| smoothquant | n/a [2] | not run yet |" in text
    assert "[1] failed after 9 s: RuntimeError: out of memory" in text
    assert "[2] n/a: SmoothQuant needs activation quantization" in text
    assert "| rtn | 4.03 / 12 / 1.5 | - |" in text


def test_results_section_is_replaced_between_the_markers(tmp_path):
    cells = load_benchmark("cells")
    path = tmp_path / "RESULTS.md"
    path.write_text("# R\n\nbefore\n\n<!-- b -->\nold\n<!-- e -->\n\nafter\n")
    cells.write_section(path, "<!-- b -->", "<!-- e -->", "new table", "## heading")
    assert path.read_text() == "# R\n\nbefore\n\n<!-- b -->\nnew table\n<!-- e -->\n\nafter\n"
    cells.write_section(path, "<!-- b2 -->", "<!-- e2 -->", "more", "## another")
    assert path.read_text().endswith("## another\n\n<!-- b2 -->\nmore\n<!-- e2 -->\n")


def test_a_refused_setting_reads_not_applicable_and_a_crash_reads_failed():
    q = load_quality()
    notes: list[str] = []
    assert q.cell_text("refused: ValueError: 128 does not divide 576", "wikitext2", notes) == "n/a [1]"
    assert q.cell_text("failed after 3 s: RuntimeError: boom", "wikitext2", notes) == "failed [2]"
    assert q.cell_text("refused: ValueError: 128 does not divide 576", "ptb", notes) == "n/a [1]"
    assert q.cell_text(None, "wikitext2", notes) == "not run yet"


def test_a_cell_from_another_protocol_is_not_reused(tmp_path):
    q = load_quality()
    cells = load_benchmark("cells")
    config = {
        "eval": {"corpora": ["wikitext2", "ptb"], "max_windows": 8, "seqlen": 2048},
        "calib": {"nsamples": 16, "seqlen": 512},
        "method": {"name": "omniquant", "epochs": 3},
    }
    config["eval"]["max_windows"] = q.PROTOCOL["eval.max_windows"]
    config["method"]["epochs"] = q.METHOD_SETTINGS["cpu"]["omniquant"]["method.epochs"]
    cell = tmp_path / "omniquant-w3a16"
    cell.mkdir()
    (cell / "results.json").write_text(json.dumps({"config": config}))
    assert cells.read_results(cell, q.protocol_of("cpu")) is not None
    assert cells.read_results(cell, q.protocol_of("paper")) is None
    config["method"]["epochs"] += 1
    (cell / "results.json").write_text(json.dumps({"config": config}))
    assert cells.read_results(cell, q.protocol_of("cpu")) is None


def test_noise_table_reports_the_spread_over_seeds_and_cells_match_their_seed(tmp_path):
    q = load_quality()
    cells = load_benchmark("cells")
    runs = {("awq", "w4a16", 0): fake_result(10.0), ("awq", "w4a16", 1): fake_result(11.0),
            ("awq", "w4a16", 2): fake_result(13.0), ("gptq", "w4a16", 0): fake_result(12.0),
            ("awq", "w3a16", 0): fake_result(20.0), ("awq", "w3a16", 1): "failed after 3 s: RuntimeError: boom"}
    text = q.noise_table(runs, ["w4a16", "w3a16"])
    assert "| awq | 11.00 [10.00, 13.00] (3) | - |" in text and "| awq | 22.00 [20.00, 26.00] (3) | - |" in text
    assert "| gptq |" not in text  # one seed: no spread to report
    assert q.noise_table({("awq", "w4a16", 0): fake_result(10.0)}, ["w4a16"]) == ""
    assert q.cell_folder("awq", "w4a16") == "awq-w4a16" and q.cell_folder("awq", "w4a16", 2) == "awq-w4a16--seed2"
    config = {"eval": {"corpora": ["wikitext2", "ptb"], "max_windows": 8, "seqlen": 2048},
              "calib": {"nsamples": 16, "seqlen": 512}, "method": {"name": "awq"}, "seed": 2}
    cell = tmp_path / "awq-w4a16--seed2"
    cell.mkdir()
    (cell / "results.json").write_text(json.dumps({"config": config}))
    assert cells.read_results(cell, q.protocol_of("cpu", 2)) is not None
    assert cells.read_results(cell, q.protocol_of("cpu")) is None


def test_mixed_tables_compare_mixed_with_uniform_at_its_bits():
    m = load_benchmark("mixed")
    uni = fake_result(20.0) | {"bits_per_weight": 3.0293}
    mix = fake_result(15.0) | {"bits_per_weight": 3.0291, "bit_plan": {"sensitivity_seconds": 12.4}}
    text = m.budgets_table({"gptq": [("w3a16", "kfac-gptq", uni, mix), ("w2a16g64", "proxy", "refused: ValueError: x", None)]})
    assert "| gptq | 3.0293 (w3a16) | kfac-gptq | 20.00 / 40.00 | 15.00 / 30.00 | 0.750 | 3.0291 | 12 |" in text
    assert "| gptq | - (w2a16g64) | proxy | refused / refused | not run yet / not run yet | - | - | - |" in text
    assert m.own_estimator("gptq", "kfac") == "kfac-gptq" and m.own_estimator("awq", "kfac") == "kfac"
    curve = m.curve_table("gptq", {"w3a16": uni}, {("proxy", 3.0): mix}, ["proxy", "measured"], [3.0, 4.0])
    assert "| 3 | 15.00 / 30.00 (3.029) | not run yet |" in curve and "| 4 | not run yet | not run yet |" in curve
    assert "proxy 12 s" in curve and m.mixed_folder("gptq", 3.0293, "proxy") == "gptq-mixed3.0293-proxy"


def test_rptq_table_puts_each_row_in_the_settings_it_applies_to():
    r = load_benchmark("rptq")
    results = {("rptq", "w4a8"): fake_result(30.0) | {"wall_seconds": {"quantize": 600.0}},
               ("gptq, per-token dynamic", "w4a16"): fake_result(25.0)}
    text = r.table("m", results)
    row = next(line for line in text.splitlines() if line.startswith("| rptq |"))
    assert row.split(" | ")[1:4] == ["", "", "30.00 / 60.00"]  # w4a16 and w3a16 are not RPTQ settings
    assert "| gptq, per-token dynamic | 25.00 / 50.00 | - / - |" in text
    assert "rptq w4a8: 600 s" in text and r.folder("rptq + LWC", "w4a4") == "rptq___LWC--w4a4"


def test_zeroshot_table_reads_each_task_and_says_which_cells_are_missing():
    z = load_benchmark("zeroshot")
    zs = {t: {"acc": 0.5, "acc_norm": 0.25, "limit": 100} for t in z.TASKS}
    zs["lambada_openai"] = {"acc": 0.3, "perplexity": 40.0, "limit": 100}
    text = z.table("m", {"fp": fake_result(20.0) | {"bits_per_weight": None, "zero_shot": zs}, "awq-w4a16": None}, 100)
    assert "| fp | 16 | 20.00 | 50.0 (25.0) | 50.0 (25.0) | 50.0 (25.0) | 50.0 (25.0) | 30.0 (40.0) |" in text
    assert "| awq-w4a16 | - | not run yet |" in text and "about 5.0 points" in text
    assert z.with_tasks(100)({"config": {}, "zero_shot": {}}) is False
