"""S3Store against a real S3 server (SeaweedFS): the commit primitives, listing and a job.

Every request goes over HTTP to the ``weed`` process of the ``s3_server`` fixture; nothing
on the data path is mocked.
"""

from __future__ import annotations

import hashlib
import io
import json
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from airflow_batch_provider.core.domain.commit import check_shard, commit_shard, new_attempt
from airflow_batch_provider.core.domain.jobs import finalize_job, plan_job
from airflow_batch_provider.core.domain.layout import JobStorage
from airflow_batch_provider.core.errors import StaleCheckpointError, StorageError
from airflow_batch_provider.core.execution.runner import ShardRunner
from airflow_batch_provider.core.stores import store_for
from airflow_batch_provider.core.stores.s3 import S3Store
from airflow_batch_provider.core.stores.urls import split_s3_url
from tests.helpers import parquet_bytes, put, read_sink, spec_on, staged, uploads
from tests.s3_server import RequestCounter, store_clients

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def store(s3_server):
    return S3Store(s3_server.storage_options())


def multipart_etag(parts: list[dict]) -> str:
    """The ETag S3 gives a completed multipart object: md5 of the part md5s, ``-N``."""
    digest = hashlib.md5(b"".join(bytes.fromhex(p["ETag"].strip('"')) for p in parts), usedforsecurity=False)
    return f"{digest.hexdigest()}-{len(parts)}"


# -- urls ------------------------------------------------------------------------------------
def test_s3_url_splits_into_bucket_and_key():
    assert split_s3_url("s3://bucket/a/b.json") == ("bucket", "a/b.json")


# -- commit primitives ------------------------------------------------------------------------
def test_create_exclusive_has_one_winner(store, s3_bucket):
    url = f"s3://{s3_bucket}/ck/shards/x.json"
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: store.create_exclusive(url, str(i).encode()), range(16)))
    assert results.count(True) == 1
    assert store.read_bytes(url) == str(results.index(True)).encode()


def test_staged_part_is_invisible_until_published(store, s3_server, s3_bucket):
    url = f"s3://{s3_bucket}/out/part-a.jsonl"
    part = staged(store, url, b'{"id": 1}\n')
    assert store.size(url) is None and store.list_files(f"s3://{s3_bucket}/out") == {}
    assert [u["Key"] for u in uploads(s3_server, s3_bucket)] == ["out/part-a.jsonl"]
    assert part.publish() is True
    assert store.read_bytes(url) == b'{"id": 1}\n'
    assert store.staged_from(part.handle).publish() is True  # idempotent: a roll-forward after a publish
    part.abort()  # aborting a completed upload leaves the object alone
    assert store.read_bytes(url) == b'{"id": 1}\n'
    assert uploads(s3_server, s3_bucket) == []


def test_publish_of_an_aborted_upload_reports_the_data_gone(store, s3_bucket):
    part = staged(store, f"s3://{s3_bucket}/out/part-b.jsonl", b"x\n")
    part.abort()
    assert store.staged_from(part.handle).publish() is False


def test_multipart_part_of_several_parts(s3_server, s3_bucket):
    store = S3Store(s3_server.storage_options(), part_size=5 << 20)  # S3's minimum part size
    data = bytes(range(256)) * ((5 << 20) // 256) + b"tail"
    part = staged(store, f"s3://{s3_bucket}/out/part-c.parquet", data)
    assert len(part.handle["parts"]) == 2
    part.publish()
    assert store.read_bytes(f"s3://{s3_bucket}/out/part-c.parquet") == data


def test_racing_attempts_one_wins_the_loser_aborts_only_its_own_upload(s3_server, s3_bucket):
    put(s3_server, s3_bucket, "in/a.parquet", parquet_bytes(range(100)))
    spec = spec_on(s3_bucket)
    storage = JobStorage.for_spec(spec, s3_server.storage_options())
    shard = plan_job(spec, storage).pending[0]
    part_url = storage.part_path(shard.shard_id)
    first = staged(storage.sink, part_url, b"winner bytes")
    second = staged(storage.sink, part_url, b"loser bytes, longer")
    assert len(uploads(s3_server, s3_bucket)) == 2
    kwargs = {"rows_in": 100, "rows_out": 100, "lines": 0}
    won, sentinel = commit_shard(storage, shard, first, attempt=new_attempt(n=1), **kwargs)
    lost, winner = commit_shard(storage, shard, second, attempt=new_attempt(n=2), **kwargs)
    assert (won, lost) == (True, False)
    assert winner["attempt"]["n"] == 1 and winner["bytes"] == len(b"winner bytes")
    assert storage.sink.read_bytes(part_url) == b"winner bytes"
    assert uploads(s3_server, s3_bucket) == []  # the loser's upload is aborted, nothing else
    head = s3_server.client().head_object(Bucket=s3_bucket, Key=split_s3_url(part_url)[1])
    assert head["ETag"].strip('"') == multipart_etag(first.handle["parts"])


def test_crash_between_sentinel_and_publish_rolls_forward(s3_server, s3_bucket):
    put(s3_server, s3_bucket, "in/a.parquet", parquet_bytes(range(100)))
    spec = spec_on(s3_bucket)
    storage = JobStorage.for_spec(spec, s3_server.storage_options())
    shard = plan_job(spec, storage).pending[0]
    part = staged(storage.sink, storage.part_path(shard.shard_id), b"committed, not yet published")
    sentinel = {
        "schema_version": 1, "shard_id": shard.shard_id, "part": storage.part_name(shard.shard_id),
        "rows_in": 100, "rows_out": 100, "lines": 0, "bytes": len(b"committed, not yet published"),
        "sha256": "-", "input_fingerprint": shard.input_fingerprint, "spec_fingerprint": spec.fingerprint,
        "fingerprint_inputs": spec.fingerprint_inputs(), "attempt": {}, "staged": part.handle,
    }
    assert storage.checkpoint.create_exclusive(storage.sentinel_path(shard.shard_id), json.dumps(sentinel).encode())
    assert storage.sink.size(storage.part_path(shard.shard_id)) is None  # the "crash"
    assert check_shard(storage, shard).committed  # completes the upload named in the sentinel
    assert storage.sink.read_bytes(storage.part_path(shard.shard_id)) == b"committed, not yet published"


def test_finalize_aborts_orphaned_uploads(s3_server, s3_bucket):
    put(s3_server, s3_bucket, "in/a.parquet", parquet_bytes(range(100)))
    spec = spec_on(s3_bucket)
    options = s3_server.storage_options()
    storage = JobStorage.for_spec(spec, options)
    shard = plan_job(spec, storage).pending[0]
    staged(storage.sink, storage.part_path(shard.shard_id), b"an attempt killed before its sentinel")
    ShardRunner(spec, options).run(shard, new_attempt())
    assert len(uploads(s3_server, s3_bucket)) == 1
    finalize_job(spec, storage)  # within the grace period: it may be another run's live attempt
    assert len(uploads(s3_server, s3_bucket)) == 1
    finalize_job(spec, storage, orphan_grace_s=0)
    assert uploads(s3_server, s3_bucket) == []


# -- listing ------------------------------------------------------------------------------------
def test_list_files_paginates_past_1000_keys_in_one_listing(store, s3_server, s3_bucket):
    client = s3_server.client()
    keys = [f"many/k{i:05d}.json" for i in range(1205)] + ["many/sub/nested.json"]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: client.put_object(Bucket=s3_bucket, Key=k, Body=b"{}"), keys))
    with RequestCounter(store.client) as count:
        files = store.list_files(f"s3://{s3_bucket}/many")
    assert len(files) == 1205 and "k01204.json" in files and "nested.json" not in files
    assert count.by_operation == {"ListObjectsV2": 2}
    assert files["k00000.json"].size == 2 and files["k00000.json"].version.endswith("-2")


def test_listing_errors_are_raised_not_read_as_empty(store, s3_server):
    with pytest.raises(StorageError, match="NoSuchBucket.*create it"):
        store.list_files("s3://no-such-bucket-abp/sink/_checkpoint/shards")
    with pytest.raises(StorageError, match="NoSuchBucket"):
        store.list_staged("s3://no-such-bucket-abp/sink")
    wrong = S3Store({**s3_server.storage_options(), "secret": "not-the-secret"})
    with pytest.raises(StorageError, match="credentials") as err:
        wrong.list_files(f"s3://{s3_server.new_bucket()}/x")
    assert s3_server.secret_key not in str(err.value)


def test_version_changes_with_content(store, s3_server, s3_bucket):
    put(s3_server, s3_bucket, "v/a.json", b"one")
    before = store.list_files(f"s3://{s3_bucket}/v")["a.json"].version
    put(s3_server, s3_bucket, "v/a.json", b"two")
    assert store.list_files(f"s3://{s3_bucket}/v")["a.json"].version != before


def test_parquet_shard_is_streamed_by_row_group_not_read_whole(s3_server, s3_bucket):
    import numpy as np

    from airflow_batch_provider.core.domain.schema.input import load_input_schema
    from airflow_batch_provider.core.execution.readers import ReadStats, read_shard

    values = np.random.default_rng(1).random(16 * 131072)  # 16 row groups of 1 MiB, incompressible
    buffer = io.BytesIO()
    pq.write_table(pa.table({"id": np.arange(len(values)), "value": values}), buffer, row_group_size=131072, compression="none")
    put(s3_server, s3_bucket, "in/big.parquet", buffer.getvalue())
    spec = spec_on(s3_bucket, rows_per_shard=131072, batch_size=8192)
    storage = JobStorage.for_spec(spec, s3_server.storage_options())
    shards = plan_job(spec, storage).pending
    assert len(shards) == 16
    schema = load_input_schema(storage)  # as a shard task reads: in the plan's input schema
    with RequestCounter(*store_clients(storage.source)) as count:
        rows = sum(b.table.num_rows for b in read_shard(storage.source, spec, shards[3], ReadStats(), schema))
    assert rows == 131072
    size = len(buffer.getvalue())
    assert 0 < count.bytes_received < size / 2, (count.bytes_received, size)  # ranged GETs, not the object


# -- a whole job, in process --------------------------------------------------------------------
def test_job_on_s3_plans_with_two_lists_and_writes_every_row_once(s3_server, s3_bucket):
    put(s3_server, s3_bucket, "in/a.parquet", parquet_bytes(range(300)))
    put(s3_server, s3_bucket, "in/b.parquet", parquet_bytes(range(300, 420)))
    spec = spec_on(s3_bucket)
    options = s3_server.storage_options()
    job = plan_job(spec, JobStorage.for_spec(spec, options))
    assert len(job.pending) == 5
    runner = ShardRunner(spec, options)
    results = [runner.run(shard, new_attempt()) for shard in job.pending]
    assert {r.status for r in results} == {"computed"}

    storage = JobStorage.for_spec(spec, options)
    with RequestCounter(*store_clients(storage.source, storage.sink, storage.checkpoint)) as count:
        again = plan_job(spec, storage)
    assert (len(again.pending), again.committed) == (0, 5)
    # source discovery (isdir + find), the sentinel prefix, the sink; two GETs: the plan, and
    # reset.json (a resume=False reset of this sink cut short is finished or closed by the plan)
    assert count.by_operation == {"ListObjectsV2": 4, "GetObject": 2}, count.by_operation

    manifest = finalize_job(spec, storage)
    assert manifest["rows_out"] == 420
    table = read_sink(s3_server, spec.sink_root)
    assert sorted(table.column("id").to_pylist()) == list(range(420))
    assert sorted(table.column("value").to_pylist()) == [i * 1.0 for i in range(420)]

    changed = spec_on(s3_bucket, predictor_kwargs={"factor": 3})
    with pytest.raises(StaleCheckpointError, match="predictor_kwargs"):
        plan_job(changed, JobStorage.for_spec(changed, options))


def test_store_for_s3_url(s3_server):
    assert isinstance(store_for("s3://b/x", s3_server.storage_options()), S3Store)
