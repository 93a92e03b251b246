"""What the runner does when the model runs out of GPU memory (what docs/predictors.md states):
nothing special. torch's ``OutOfMemoryError`` is an exception like any other, so under
``bad_rows="fail"`` the shard fails, retryable, naming it and committing nothing; under
``"skip"`` the batch is split until the pieces fit, the rows are written, and only a row that
alone does not fit is rejected. Raised here by a predictor that "fits" at most 8 rows, on CPU
(torch's own exception type, as CUDA raises it)."""

from __future__ import annotations

import json
import os

import pytest

torch = pytest.importorskip("torch")

from airflow_batch_provider.core.domain.commit import new_attempt  # noqa: E402
from airflow_batch_provider.core.domain.jobs import plan_job  # noqa: E402
from airflow_batch_provider.core.errors import PredictorFailedError, is_retryable  # noqa: E402
from airflow_batch_provider.core.execution.runner import ShardRunner  # noqa: E402
from tests.helpers import make_spec, rows, sink_ids, write_jsonl  # noqa: E402

FITS = 8  # rows the "GPU" holds at once
HUGE = 13  # a row that does not fit even alone


class FitsEightRows:
    def __init__(self):
        self.sizes: list[int] = []

    def __call__(self, batch):
        ids = [int(i) for i in batch["id"]]
        self.sizes.append(len(ids))
        if len(ids) > FITS or HUGE in ids:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB (batch of {len(ids)})")
        return {"id": batch["id"], "value": batch["value"] * 2}


def run(spec, predictor):
    runner = ShardRunner(spec, predictor=predictor)
    return [runner.run(shard, new_attempt()) for shard in plan_job(spec).pending]


def test_fail_policy_fails_the_shard_retryably_naming_the_oom_and_commits_nothing(tmp_path):
    source = write_jsonl(str(tmp_path / "in" / "rows.jsonl"), rows(40))
    spec = make_spec(source, str(tmp_path / "out"), predictor="m:C", batch_size=32, rows_per_shard=40)
    with pytest.raises(PredictorFailedError) as caught:
        run(spec, FitsEightRows())
    assert "the predictor raised OutOfMemoryError: CUDA out of memory" in str(caught.value)
    assert str(caught.value).endswith("rows.jsonl lines 1-32")  # the shard, the file and the batch's lines
    assert is_retryable(caught.value)  # Airflow retries it: with the same batch_size, the same OOM
    assert not os.path.exists(tmp_path / "out" / "_SUCCESS") and sink_ids(tmp_path / "out") == []


def test_skip_policy_splits_the_batch_until_it_fits_and_rejects_only_a_row_that_never_fits(tmp_path):
    source = write_jsonl(str(tmp_path / "in" / "rows.jsonl"), rows(96))
    spec = make_spec(source, str(tmp_path / "out"), predictor="m:C", batch_size=32, rows_per_shard=96, bad_rows="skip")
    predictor = FitsEightRows()
    [result] = run(spec, predictor)
    assert sink_ids(tmp_path / "out") == [i for i in range(96) if i != HUGE]
    assert (result.rows_in, result.rows_out, result.rows_rejected) == (96, 95, 1)
    [rejected] = [json.loads(line) for line in open(tmp_path / "out" / "_rejected" / f"{result.shard_id}.jsonl")]
    assert rejected["line"] == HUGE + 1 and "OutOfMemoryError: CUDA out of memory" in rejected["error"]
    # each of the 3 batches starts at the full batch_size again and is halved until the pieces
    # fit (32 -> 16 -> 8); the huge row's pieces are halved down to the row alone
    assert predictor.sizes[:3] == [32, 16, 8] and predictor.sizes.count(32) == 3
    assert predictor.sizes.count(1) == 2  # row 12 alone (fits) and row 13 alone (rejected)
    assert len(predictor.sizes) == 3 * 7 + 6  # 7 calls per batch that fits in 8s; 6 more to isolate row 13
