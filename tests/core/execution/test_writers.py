"""Parts are written in row groups of many predictor batches, within bounded memory, and the
batches they hold cannot be changed by a predictor that reuses its output buffers."""

from __future__ import annotations

import glob
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from airflow_batch_provider.core.domain.commit import new_attempt
from airflow_batch_provider.core.domain.jobs import finalize_job, plan_job
from airflow_batch_provider.core.execution.runner import ShardRunner
from airflow_batch_provider.core.execution.writers import PartWriter
from airflow_batch_provider.core.spec import JobSpec
from tests.helpers import rows, write_jsonl


def run_job(spec: JobSpec) -> None:
    runner = ShardRunner(spec)
    for shard in plan_job(spec).pending:
        runner.run(shard, new_attempt())
    finalize_job(spec)


def parts(sink: str) -> list[pq.ParquetFile]:
    return [pq.ParquetFile(path) for path in sorted(glob.glob(f"{sink}/part-*.parquet"))]


def test_small_batches_make_one_row_group_per_part_not_one_per_batch(tmp_path):
    source = write_jsonl(str(tmp_path / "in.jsonl"), rows(1000))
    spec = JobSpec(source=source, source_format="jsonl", sink=str(tmp_path / "out"), predictor="tests.predictors:Doubler",
                     batch_size=8, rows_per_shard=500)
    run_job(spec)
    found = parts(spec.sink_root)
    assert [p.metadata.num_row_groups for p in found] == [1, 1]  # 63 batches each, written batch by batch before
    table = pa.concat_tables([p.read() for p in found])
    assert sorted(table.column("id").to_pylist()) == list(range(1000))


def write_batches(batch_rows: int, batches: int, **limits: int) -> pq.ParquetFile:
    stream = io.BytesIO()
    writer = PartWriter(stream, "parquet", **limits)
    for index in range(batches):
        ids = np.arange(index * batch_rows, (index + 1) * batch_rows)
        writer.write(pa.table({"id": ids, "value": ids.astype(np.float64)}))
    writer.close()
    assert writer.rows == batch_rows * batches
    return pq.ParquetFile(io.BytesIO(stream.getvalue()))


def test_a_row_group_is_written_once_row_group_rows_are_buffered():
    part = write_batches(30, 10, row_group_rows=100)
    sizes = [part.metadata.row_group(i).num_rows for i in range(part.metadata.num_row_groups)]
    assert sizes == [120, 120, 60]  # four batches reach 100 rows; the part's end writes the rest
    assert part.read().column("id").to_pylist() == list(range(300))  # every row, in order


def test_buffered_memory_is_bounded_by_row_group_bytes():
    # 100 rows of two 8-byte columns are 1,600 bytes: a 4,000-byte budget writes every third batch
    part = write_batches(100, 9, row_group_bytes=4000)
    sizes = [part.metadata.row_group(i).num_rows for i in range(part.metadata.num_row_groups)]
    assert sizes == [300, 300, 300]
    assert part.read().column("id").to_pylist() == list(range(900))


def test_a_predictor_reusing_its_output_buffer_keeps_every_row(tmp_path):
    source = write_jsonl(str(tmp_path / "in.jsonl"), rows(200))
    spec = JobSpec(source=source, source_format="jsonl", sink=str(tmp_path / "out"),
                     predictor="tests.predictors:ReusedBufferEmbedder", batch_size=16, rows_per_shard=200)
    run_job(spec)
    table = pa.concat_tables([p.read() for p in parts(spec.sink_root)])
    assert table.num_rows == 200
    for row in table.to_pylist():
        assert row["embedding"] == [row["id"], row["id"]] and row["score"] == row["id"], row
