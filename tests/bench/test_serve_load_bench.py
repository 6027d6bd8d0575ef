"""benchmarks/serve_load.py: every request of both phases succeeds, and the table reports
latencies and a rate for each."""

import json

from conftest import benchmark_script


def test_the_load_benchmark_serves_every_request(tmp_path, capsys, gpt2_ranks):
    benchmark_script("serve_load").main(["--preset", "baby", "--clients", "3", "--requests", "2",
                                         "--sequential", "2", "--max-tokens", "6",
                                         "--json", str(tmp_path / "load.json"),
                                         *(["--gpt2-ranks", gpt2_ranks] if gpt2_ranks else [])])
    report = json.loads((tmp_path / "load.json").read_text())
    for phase, clients in (("single", 1), ("concurrent", 3)):
        r = report[phase]
        assert r["errors"] == 0 and r["clients"] == clients and r["requests"] == 2 * clients
        assert r["tokens"] > 0 and 0 < r["ttft_p50"] <= r["latency_p99"]
    assert "aggregate speed-up at 3 concurrent streams" in capsys.readouterr().out
