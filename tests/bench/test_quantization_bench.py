"""benchmarks/quantization.py: it trains, scores every setting and decodes with each; int8
keeps the trained model's perplexity within 1% and its weights take a quarter of
float32's bytes."""

import json

from conftest import benchmark_script


def test_the_quantization_benchmark_scores_and_times_every_setting(tmp_path, capsys):
    benchmark_script("quantization").main(["--steps", "30", "--groups", "32", "--decode-preset", "tiny",
                                           "--decode-group", "32",
                                           "--batches", "1", "--rounds", "1", "--prompt-tokens", "4",
                                           "--new-tokens", "4", "--json", str(tmp_path / "q.json")])
    report = json.loads((tmp_path / "q.json").read_text())
    ppl = {r["weights"]: r["perplexity"] for r in report["perplexity"]}
    assert set(ppl) == {"float32", "int8", "int4 (group 32)"}
    assert abs(ppl["int8"] / ppl["float32"] - 1) < 0.01
    decode = {r["weights"]: r for r in report["decode"]}
    assert all(r["ms_per_token"] > 0 for r in decode.values())
    assert decode["int8"]["weight_bytes"] < decode["float32"]["weight_bytes"] / 3
    assert "| int4 (group 32) |" in capsys.readouterr().out
