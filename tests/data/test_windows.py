import numpy as np
import pytest

from gptjax.data.windows import WindowSampler, eval_batches, gather
from gptjax.errors import GptjaxError


def test_sliding_windows_match_the_book():
    tokens = np.arange(20, dtype=np.uint16)
    s = WindowSampler(20, context=4, batch_size=3, kind="sliding", stride=4, shuffle=False)
    # The book's loop: for i in range(0, len(ids) - max_length, stride).
    assert s.n_windows == len(range(0, 20 - 4, 4))
    b = gather(tokens, s.starts(0), 4)
    assert b["inputs"].tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert b["targets"].tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
    assert b["inputs"].dtype == np.int32
    # The stream of windows wraps into the next epoch.
    assert s.starts(1).tolist() == [12, 0, 4]


def test_stride_one_windows():
    s = WindowSampler(10, context=4, batch_size=6, kind="sliding", stride=1, shuffle=False)
    assert s.n_windows == 6 and s.starts(0).tolist() == [0, 1, 2, 3, 4, 5]


def test_shuffled_epochs_visit_every_window_once():
    s = WindowSampler(1000, context=8, batch_size=7, kind="sliding", stride=3, seed=5)
    n = s.n_windows
    starts = np.concatenate([s.starts(step) for step in range(n * 2 // 7 + 1)])
    first, second = starts[:n], starts[n:2 * n]
    assert sorted(first.tolist()) == list(range(0, 3 * n, 3))
    assert sorted(second.tolist()) == list(range(0, 3 * n, 3))
    assert first.tolist() != list(range(0, 3 * n, 3)) and first.tolist() != second.tolist()


def test_random_offsets_depend_only_on_seed_and_step():
    a = WindowSampler(10_000, 16, 8, "random", seed=1)
    b = WindowSampler(10_000, 16, 8, "random", seed=1)
    assert a.starts(7).tolist() == b.starts(7).tolist()
    assert a.starts(7).tolist() != a.starts(8).tolist()
    assert a.starts(7).tolist() != WindowSampler(10_000, 16, 8, "random", seed=2).starts(7).tolist()
    assert all(0 <= x <= 10_000 - 17 for step in range(50) for x in a.starts(step))


@pytest.mark.parametrize("kind", ["random", "sliding"])
def test_offsets_stay_64_bit_past_2_to_the_31(kind):
    n = 6_000_000_000
    s = WindowSampler(n, 1024, 64, kind, seed=0)
    starts = np.concatenate([s.starts(step) for step in range(3)])
    assert starts.dtype == np.int64
    assert starts.max() > 2**32 and starts.max() <= n - 1025


def test_too_short_for_one_window():
    with pytest.raises(GptjaxError, match="fewer than one window"):
        WindowSampler(64, context=64, batch_size=1)


def test_eval_batches_pad_with_zero_weights():
    tokens = np.arange(50, dtype=np.uint16)
    batches = eval_batches(tokens, context=4, batch_size=4, max_batches=10)
    # Non-overlapping windows at 0, 4, ..., 44 (12 windows) -> 3 full batches.
    assert len(batches) == 3 and batches[0]["inputs"][1].tolist() == [4, 5, 6, 7]
    batches = eval_batches(tokens[:23], context=4, batch_size=4, max_batches=10)
    assert len(batches) == 2 and batches[1]["weights"].sum(axis=1).tolist() == [4, 0, 0, 0]
