"""benchmarks/pruning.py: every method prunes the share it says, recovery runs, and the
plot is written."""

import json

from conftest import benchmark_script


def test_the_pruning_benchmark_prunes_recovers_and_plots(tmp_path, capsys):
    benchmark_script("pruning").main(["--steps", "30", "--recover-steps", "3", "--score-batches", "1",
                                      "--shares", "0.5", "--plot", str(tmp_path / "p.png"),
                                      "--json", str(tmp_path / "p.json")])
    report = json.loads((tmp_path / "p.json").read_text())
    rows = {r["method"]: r for r in report["rows"]}
    assert set(rows) == {"none", "magnitude", "heads", "neurons"}
    assert rows["none"]["kernels"] == 0 and rows["none"]["perplexity"] == report["unpruned"]
    assert abs(rows["magnitude"]["kernels"] - 0.5) < 1e-3
    assert all(r["recovered"] > 0 for r in rows.values())
    assert (tmp_path / "p.png").stat().st_size > 10_000
    assert "| magnitude | 50% | 50.0% |" in capsys.readouterr().out
