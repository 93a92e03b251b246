"""The safety of shared sinks and of the commit path on a real S3 server (SeaweedFS).

Faults that a healthy server never produces (a PUT retried by botocore after it landed, a
409 that never clears) are injected at botocore's own event hooks: the request still goes
through botocore's retry and response parsing, and every other byte over HTTP to ``weed``.
"""

from __future__ import annotations

import json

import pytest

from airflow_batch_provider.core.domain.commit import commit_shard, new_attempt
from airflow_batch_provider.core.domain.jobs import finalize_job, plan_job
from airflow_batch_provider.core.domain.layout import JobStorage
from airflow_batch_provider.core.errors import StorageError
from airflow_batch_provider.core.execution.runner import ShardRunner
from airflow_batch_provider.core.stores.s3 import S3Store
from tests.helpers import parquet_bytes, put, read_sink, run_all, spec_on, staged, two_runs_at_once, uploads

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def job(s3_server, s3_bucket):
    put(s3_server, s3_bucket, "in/a.parquet", parquet_bytes(range(300)))
    spec = spec_on(s3_bucket)
    return spec, JobStorage.for_spec(spec, s3_server.storage_options()), s3_server.storage_options()


def ids(s3_server, spec):
    return sorted(read_sink(s3_server, spec.sink_root).column("id").to_pylist())


def test_remove_if_unchanged_deletes_only_what_was_read(s3_server, s3_bucket):
    store = S3Store(s3_server.storage_options())
    url = f"s3://{s3_bucket}/ckpt/shards/x.json"
    store.write_atomic(url, b"broken")
    assert store.remove_if_unchanged(url, b"something else") is False
    assert store.read_bytes(url) == b"broken"
    assert store.remove_if_unchanged(url, b"broken") is True
    assert store.read_bytes(url) is None
    assert store.remove_if_unchanged(url, b"broken") is False


def test_delete_with_a_stale_if_match_is_refused_by_the_server(s3_server, s3_bucket):
    """What makes ``remove_if_unchanged`` conditional between its GET and its DELETE."""
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="k", Body=b"old")
    stale = client.head_object(Bucket=s3_bucket, Key="k")["ETag"]
    client.put_object(Bucket=s3_bucket, Key="k", Body=b"committed in between")
    try:
        client.delete_object(Bucket=s3_bucket, Key="k", IfMatch=stale)
    except Exception as err:  # 412 PreconditionFailed: the object stays
        assert "PreconditionFailed" in str(err) or "412" in str(err)
    assert client.get_object(Bucket=s3_bucket, Key="k")["Body"].read() == b"committed in between"


def test_a_put_retried_by_botocore_after_it_landed_is_recognised_as_our_own(job, s3_server):
    spec, storage, options = job
    client = storage.checkpoint.client
    retried = []

    def retry_the_first_conditional_put(response=None, attempts=1, request_dict=None, **_):
        headers = (request_dict or {}).get("headers", {})
        if "If-None-Match" in headers and attempts == 1 and response and response[0].status_code == 200:
            retried.append(request_dict["url"])
            return 0  # "the reply was lost": botocore sends the PUT again, which answers 412
        return None

    client.meta.events.register("needs-retry.s3.PutObject", retry_the_first_conditional_put, unique_id="abp-lost-reply")
    try:
        results = run_all(spec, options)
    finally:
        client.meta.events.unregister("needs-retry.s3.PutObject", unique_id="abp-lost-reply")
    assert len(retried) == 5  # plan, output schema, 3 sentinels: each create retried after it landed
    assert {r.status for r in results} == {"computed"}
    finalize_job(spec, storage)
    assert ids(s3_server, spec) == list(range(300))


class _Body:
    def __init__(self, data: bytes):
        self.data = data

    def stream(self, **_):
        yield self.data


def test_a_409_that_never_clears_is_a_storage_error_saying_what_to_do(job):
    from botocore.awsrequest import AWSResponse

    spec, storage, options = job
    client = storage.checkpoint.client
    body = b"<Error><Code>ConditionalRequestConflict</Code><Message>in flight</Message></Error>"

    def conflict(request=None, **_):
        if request is not None and "If-None-Match" in request.headers:
            return AWSResponse(request.url, 409, {"Content-Type": "application/xml"}, _Body(body))
        return None

    client.meta.events.register("before-send.s3.PutObject", conflict, unique_id="abp-409")
    try:
        with pytest.raises(StorageError, match=r"409 ConditionalRequestConflict after 4 tries.*retry the task"):
            run_all(spec, options)
    finally:
        client.meta.events.unregister("before-send.s3.PutObject", unique_id="abp-409")
    assert run_all(spec, options)  # the retry commits
    finalize_job(spec, storage, orphan_grace_s=0)


def test_a_publish_failing_for_good_does_not_wedge_the_plan(job, s3_server):
    spec, storage, options = job
    shard = plan_job(spec, storage).pending[0]
    part = staged(storage.sink, storage.part_path(shard.shard_id), b"staged")
    broken = {**part.handle, "parts": [{"PartNumber": 1, "ETag": '"00000000000000000000000000000000"'}]}
    sentinel = {
        "schema_version": 1, "shard_id": shard.shard_id, "part": storage.part_name(shard.shard_id), "rows_in": 100,
        "rows_out": 100, "lines": 0, "bytes": 6, "sha256": "-", "input_fingerprint": shard.input_fingerprint,
        "spec_fingerprint": spec.fingerprint, "attempt": {}, "staged": broken, "sink": spec.sink_root,
    }
    assert storage.checkpoint.create_exclusive(storage.sentinel_path(shard.shard_id), json.dumps(sentinel).encode())
    with pytest.raises(StorageError, match="CompleteMultipartUpload"):
        storage.sink.staged_from(broken).publish()
    job = plan_job(spec, storage)  # quarantines that commit instead of failing on it forever
    assert shard.shard_id in {s.shard_id for s in job.pending}
    assert any("cannot be published" in n for n in job.notes), job.notes
    run_all(spec, options)
    finalize_job(spec, storage, orphan_grace_s=0)
    assert ids(s3_server, spec) == list(range(300))


def test_finalize_never_aborts_a_fresh_upload_of_another_run(job, s3_server, s3_bucket):
    spec, storage, options = job
    run_all(spec, options)
    shard = plan_job(spec, storage).plan.shards[0]
    live = staged(storage.sink, storage.part_path(shard.shard_id), b"another run's attempt, mid-shard")
    finalize_job(spec, storage)
    assert [u["UploadId"] for u in uploads(s3_server, s3_bucket)] == [live.upload_id]
    won, _ = commit_shard(storage, shard, live, rows_in=1, rows_out=1, lines=0, attempt=new_attempt())
    assert not won and uploads(s3_server, s3_bucket) == []  # it lost, and aborted its own
    assert ids(s3_server, spec) == list(range(300))


def test_two_runs_of_one_spec_on_s3_at_once_both_finish_with_every_row_once(job, s3_server, s3_bucket):
    spec, _, options = job
    results = two_runs_at_once(spec, options)
    assert [rows for _, rows in results] == [300, 300]
    assert [s for run, _ in results for s in run].count("computed") == 3
    assert ids(s3_server, spec) == list(range(300))
    assert uploads(s3_server, s3_bucket) == []  # every loser aborted its own upload


def test_resume_false_on_s3_once_per_key_and_only_its_own(job, s3_server, s3_bucket):
    spec, storage, options = job
    run_all(spec, options)
    finalize_job(spec, storage)
    put(s3_server, s3_bucket, "out/part-00000-foreign.parquet", parquet_bytes(range(1)))
    fresh = spec_on(s3_bucket, resume=False)
    fresh_storage = JobStorage.for_spec(fresh, options)
    first = plan_job(fresh, fresh_storage, reset_key="run-1")
    assert len(first.pending) == 3 and storage.sink.size(storage.manifest_path) is None
    ShardRunner(fresh, options).run(first.pending[0], new_attempt())
    assert len(plan_job(fresh, fresh_storage, reset_key="run-1").pending) == 2
    listed = S3Store(options).list_files(spec.sink_root)
    assert "part-00000-foreign.parquet" in listed
