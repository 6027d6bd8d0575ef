"""benchmarks/sweep_throughput.py: both ways train the same members alike (the script
checks their last losses) and the table has a positive rate for each."""

from conftest import benchmark_script


def test_the_sweep_benchmark_times_both_ways_on_the_same_training(capsys):
    benchmark_script("sweep_throughput").main(["--case", "tiny:1:8", "--members", "2",
                                               "--repeats", "2", "--steps", "2"])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()
            if line.startswith("| tiny")]
    assert len(rows) == 1 and rows[0][1] == "2"
    swept, alone = (float(rows[0][i].replace(",", "")) for i in (3, 4))
    assert swept > 0 and alone > 0
    assert float(rows[0][5].split("x")[0]) > 0
