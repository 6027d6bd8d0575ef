"""gptjax.cpu.measured_choice: timing equivalent paths once and keeping the answer. The clock is
injected, so what is asserted is the choosing and recording, never a machine's speed."""

import json

import jax
import jax.numpy as jnp
import pytest

from gptjax.cpu import measured_choice


class FakeClock:
    """Time that only moves when a candidate runs, by that candidate's cost."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def candidates(self, costs: dict[str, float]):
        def run(cost):
            def once():
                self.now += cost
                return jnp.zeros(())
            return once
        return lambda: {name: run(cost) for name, cost in costs.items()}


def _never_built():
    raise AssertionError("a recorded answer must not build the candidates again")


def test_the_fastest_is_chosen_recorded_with_its_timings_and_then_read_back(tmp_path):
    clock, record = FakeClock(), tmp_path / "choices.json"
    make = clock.candidates({"kernel": 0.010, "xla": 0.008})
    assert measured_choice.fastest(record, "one row", make, prefer="kernel", clock=clock) == "xla"
    entry = json.loads(record.read_text())["one row"]
    assert entry["choice"] == "xla" and entry["median_ms"] == {"kernel": 10.0, "xla": 8.0}
    assert entry["repeats"] == 21 and entry["prefer_within"] == 0.03
    assert measured_choice.fastest(record, "one row", _never_built, prefer="kernel") == "xla"


def test_a_near_tie_keeps_the_preferred_path(tmp_path):
    clock = FakeClock()
    make = clock.candidates({"kernel": 0.0102, "xla": 0.0100})  # 2% apart, under the 3%
    assert measured_choice.fastest(tmp_path / "r.json", "k", make, prefer="kernel",
                                   clock=clock) == "kernel"
    make = clock.candidates({"kernel": 0.0104, "xla": 0.0100})  # 4% apart
    assert measured_choice.fastest(tmp_path / "s.json", "k", make, prefer="kernel",
                                   clock=clock) == "xla"


def test_an_unreadable_or_partial_record_is_measured_again_and_other_entries_are_kept(tmp_path):
    clock, record = FakeClock(), tmp_path / "choices.json"
    record.write_text("{not json")
    make = clock.candidates({"a": 0.002, "b": 0.001})
    assert measured_choice.fastest(record, "first", make, prefer="a", clock=clock) == "b"
    first = json.loads(record.read_text())["first"]
    assert record.stat().st_mode & 0o777 == 0o644  # readable by a shared cache's other users
    for broken in ("not an entry", {"choice": "a"}, {"choice": "c", "median_ms": {"a": 1.0}}):
        record.write_text(json.dumps({"first": first, "second": broken}))
        assert measured_choice.fastest(record, "second", clock.candidates(
            {"a": 0.001, "b": 0.002}), prefer="a", clock=clock) == "a"
        entries = json.loads(record.read_text())
        assert entries["first"] == first and entries["second"]["median_ms"] == {"a": 1.0, "b": 2.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["choices.json", "choices.json.lock"]


def test_a_failed_measurement_keeps_the_preferred_path_with_a_warning_and_records_nothing(
        tmp_path):
    def make():
        raise MemoryError("no room for the weights")
    with pytest.warns(RuntimeWarning, match="using 'kernel': MemoryError: no room"):
        assert measured_choice.fastest(tmp_path / "r.json", "k", make, prefer="kernel") == "kernel"
    assert not (tmp_path / "r.json").exists()


def test_a_record_that_cannot_be_written_still_gives_the_choice(tmp_path):
    # (A folder that does not exist: chmod does not stop root, who runs CI here.)
    clock, record = FakeClock(), tmp_path / "not-a-folder" / "r.json"
    make = clock.candidates({"a": 0.002, "b": 0.001})
    assert measured_choice.fastest(record, "k", make, prefer="a", clock=clock) == "b"
    assert list(tmp_path.iterdir()) == []


def test_a_preferred_name_that_is_not_a_candidate_is_refused(tmp_path):
    make = FakeClock().candidates({"a": 0.001})
    with pytest.raises(ValueError, match="prefer='b' is not one of the candidates"):
        measured_choice.fastest(tmp_path / "r.json", "k", make, prefer="b")
    assert not (tmp_path / "r.json").exists()


def test_it_measures_real_jitted_runs_while_another_function_is_traced(tmp_path):
    """Decoding asks while its step is being traced: the runs must execute, not be staged
    (a staged run would fail in `make` and leave no record), under any transfer guard."""
    def make():
        a = jnp.ones((64, 64))
        assert not isinstance(a, jax.core.Tracer)  # made and run for real, not staged
        return {"matmul": lambda: jax.jit(jnp.matmul)(a, a), "add": lambda: a + a}

    @jax.jit
    def step(x):
        return x * (measured_choice.fastest(tmp_path / "r.json", "k", make, prefer="matmul",
                                            repeats=3) in ("matmul", "add"))
    x = jnp.float32(2.0)
    with jax.transfer_guard("disallow"):
        assert float(step(x)) == 2.0
    entry = json.loads((tmp_path / "r.json").read_text())["k"]
    assert set(entry["median_ms"]) == {"matmul", "add"} and min(entry["median_ms"].values()) > 0
