"""Bad-input corpus, listing the source (issue 19 item 9): files under ``_``- or ``.``-prefixed
paths are skipped, as Spark, Hive and pyarrow skip them (``_SUCCESS``, ``_staging/``, ``.crc``
files live there), but never silently: the plan's notes say how many, show one, and say how to
include them. A source that names such a file, directory or path part directly is read.
"""

from __future__ import annotations

import json
import os

import pytest

from airflow_batch_provider.core.domain.commit import new_attempt
from airflow_batch_provider.core.domain.jobs import finalize_job, plan_job
from airflow_batch_provider.core.errors import BatchSpecError
from airflow_batch_provider.core.execution.runner import ShardRunner
from airflow_batch_provider.core.spec import JobSpec
from tests.corpus.readback import read_back


def write(path, ids) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        handle.writelines(json.dumps({"id": i}) + "\n" for i in ids)
    return str(path)


def run(source, sink) -> tuple[list[str], list[int]]:
    """(the plan's notes, the ids the sink reads back)."""
    spec = JobSpec(source=str(source), sink=str(sink), predictor="tests.predictors:Identity", source_format="jsonl")
    job = plan_job(spec)
    runner = ShardRunner(spec)
    for shard in job.pending:
        runner.run(shard, new_attempt())
    finalize_job(spec)
    return job.notes, sorted(r["id"] for r in read_back(str(sink), "parquet").to_pylist())


@pytest.fixture
def source(tmp_path):
    write(tmp_path / "in/a.jsonl", [0])
    write(tmp_path / "in/_staging/b.jsonl", [1])
    write(tmp_path / "in/.hidden/c.jsonl", [2])
    write(tmp_path / "in/sub/_d.jsonl", [3])
    return tmp_path / "in"


def test_hidden_files_are_skipped_with_a_note_naming_count_example_and_remedy(source, tmp_path):
    notes, ids = run(source, tmp_path / "out")
    assert ids == [0]
    [note] = notes
    assert note == (
        f"skipped 3 input file(s) under a path part starting with '_' or '.' (as Spark, Hive and pyarrow do: "
        f"_SUCCESS, _staging/ and .crc files live there), e.g. {source}/.hidden/c.jsonl; to read them, point "
        "source at such a file or directory (or a glob that names the part, e.g. '_staging/*.jsonl')"
    )


def test_no_note_when_nothing_is_hidden(tmp_path):
    write(tmp_path / "in/a.jsonl", [0])
    assert run(tmp_path / "in", tmp_path / "out") == ([], [0])


@pytest.mark.parametrize("named, ids", [
    ("_staging", [1]),  # a hidden directory named as the source
    ("_staging/b.jsonl", [1]),  # a file under it
    ("sub/_d.jsonl", [3]),  # a hidden file named directly
    (".hidden/*.jsonl", [2]),  # a glob whose fixed part is hidden
    ("*/_*.jsonl", [3]),  # a glob that names the hidden part itself
])
def test_a_source_naming_a_hidden_path_directly_is_read(source, tmp_path, named, ids):
    notes, read = run(f"{source}/{named}", tmp_path / "out")
    assert read == ids and notes == []


def test_only_hidden_files_fails_saying_they_were_skipped(tmp_path):
    write(tmp_path / "in/_tmp/a.jsonl", [0])
    with pytest.raises(BatchSpecError) as err:
        run(tmp_path / "in", tmp_path / "out")
    assert str(err.value) == (
        f"source={str(tmp_path / 'in')!r} matched no jsonl input files (looked for .jsonl, .ndjson, .json files); "
        f"1 file(s) under a path part starting with '_' or '.' were skipped, e.g. {tmp_path}/in/_tmp/a.jsonl: "
        "point source at them directly to read them"
    )
