"""The counters contract (``core/counters.py``): a predictor's ``add`` lands in the tally of
the shard being computed, and nowhere else; records add up name by name."""

from __future__ import annotations

import contextvars
import threading

import pytest

from airflow_batch_provider import counters as public
from airflow_batch_provider.core import counters


def test_add_counts_into_the_open_tally_only():
    public.add("tokens_in", 5)  # outside a shard: counts into nothing, raises nothing
    with counters.collecting() as tally:
        public.add("tokens_in", 5)
        public.add("tokens_in", 7)
        public.add("requests")
        public.add("waited_s", 0.25)
    public.add("tokens_in", 100)
    assert tally.totals() == {"requests": 1, "tokens_in": 12, "waited_s": 0.25}
    assert tally.problem is None


@pytest.mark.parametrize(("name", "value", "says"), [
    ("gpu_seconds", 1, "one of the runner's own figures"),
    ("rows_in", 1, "one of the runner's own figures"),
    ("tokens in", 1, "must be an identifier"),
    ("tokens", True, "an int or a finite float"),
    ("tokens", float("nan"), "an int or a finite float"),
    ("tokens", "3", "an int or a finite float"),
])
def test_a_misuse_raises_outside_a_shard_and_is_kept_for_the_runner_inside_one(name, value, says):
    with pytest.raises(ValueError, match=says):
        public.add(name, value)
    with counters.collecting() as tally:
        public.add(name, value)  # inside: not raised into the predictor's call (bad_rows would reject rows for it)
        public.add("fine", 1)
    assert says in tally.problem and tally.totals() == {"fine": 1}


def test_shards_side_by_side_never_mix_their_counts():
    """Two shards computed at once in one process (threads), each with its own tally."""
    results, barrier = {}, threading.Barrier(2)

    def shard(name: str, amount: int) -> None:
        with counters.collecting() as tally:
            for _ in range(100):
                public.add("tokens_out", amount)
                if _ == 50:
                    barrier.wait()
        results[name] = tally.totals()

    threads = [threading.Thread(target=shard, args=(n, a)) for n, a in (("a", 1), ("b", 2))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {"a": {"tokens_out": 100}, "b": {"tokens_out": 200}}


def test_a_thread_the_predictor_starts_counts_when_run_in_a_copy_of_its_context():
    with counters.collecting() as tally:
        plain = threading.Thread(target=public.add, args=("lost", 1))
        plain.start()
        plain.join()
        context = contextvars.copy_context()
        copied = threading.Thread(target=context.run, args=(public.add, "kept", 1))
        copied.start()
        copied.join()
    assert tally.totals() == {"kept": 1}


def test_records_add_up_name_by_name_and_old_records_count_as_zero():
    records = [{"tokens_in": 3, "gpu_seconds": 1.5}, None, {}, {"tokens_in": 4, "requests": 2, "note": "text"}]
    assert counters.summed(records) == {"gpu_seconds": 1.5, "requests": 2, "tokens_in": 7}
    assert counters.summed([]) == {}


def test_cost_is_gpu_hours_times_the_price():
    assert counters.cost({"gpu_seconds": 7200.0}, 2.5) == pytest.approx(5.0)
    assert counters.cost({}, 2.5) == 0.0
    assert counters.cost({"gpu_seconds": 7200.0}, None) is None
