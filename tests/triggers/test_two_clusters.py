"""One triggerer process serves shard triggers of two ``ray`` connections: two real Ray heads,
each with its own token, each running a shard; both triggers run in this one process, side by
side, and each follows its own cluster's call (through one Ray client child per cluster)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from airflow_batch_provider.core import api
from airflow_batch_provider.hooks.ray import RayHook
from airflow_batch_provider.spec import BatchSpec
from airflow_batch_provider.triggers.shard import RayShardTrigger
from tests.helpers import ROOT, rows, write_jsonl
from tests.ray_cluster import RayCluster

pytestmark = pytest.mark.slow

SUBMIT = """
import json, sys
from airflow_batch_provider.core import api
spec = api.JobSpec.from_dict(json.loads(sys.argv[1]))
api.connect(api.RayTarget(address=sys.argv[2], token=sys.stdin.readline().strip()))
job = api.plan(spec)
work = api.ReplicaPool(spec).submit(job.pending, api.new_attempt("two-clusters"))
print(json.dumps({"work": work, "shards": [s.to_dict() for s in job.pending]}), flush=True)
"""


@pytest.fixture(scope="module")
def clusters():
    started = []
    try:
        for label in ("trig-a", "trig-b"):
            started.append(RayCluster(label, head_cpus=1).start())
        yield started
    finally:
        for cluster in started:
            cluster.stop()
        api.RayDriver.stop_all()


def submit(cluster: RayCluster, spec: BatchSpec) -> dict:
    """Start the shards on ``cluster`` from a short-lived driver (a shard task that deferred)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PYTHONPATH"] = ROOT
    out = subprocess.run([sys.executable, "-c", SUBMIT, json.dumps(spec.core().to_dict()), cluster.address], input=cluster.token + "\n",
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_one_triggerer_follows_shards_on_two_clusters(clusters, tmp_path, monkeypatch):
    specs, submitted = {}, {}
    for index, cluster in enumerate(clusters):
        source = write_jsonl(str(tmp_path / f"in{index}" / "rows.jsonl"), rows(10 * (index + 1)))
        specs[index] = BatchSpec(source=source, source_format="jsonl", sink=str(tmp_path / f"out{index}"),
                                 predictor="tests.predictors:SlowDoubler", predictor_kwargs={"sleep_s": 0.5 + index / 10}, batch_size=5,
                                 rows_per_shard=100, num_cpus=1)
        submitted[index] = submit(cluster, specs[index])
    targets = {f"ray_{i}": api.RayTarget(address=c.address, token=c.token) for i, c in enumerate(clusters)}

    async def aget_target(self):
        return targets[self.ray_conn_id]

    monkeypatch.setattr(RayHook, "aget_target", aget_target)

    def trigger(index: int) -> RayShardTrigger:
        work = submitted[index]["work"]
        return RayShardTrigger(worker=work["worker"], token=work["token"], spec=specs[index].to_dict(),
                               shards=submitted[index]["shards"], ray_conn_id=f"ray_{index}", label=f"c{index}", poll_interval=0.2)

    async def first_event(t: RayShardTrigger):
        async for event in t.run():
            return event.payload

    async def both():
        return await asyncio.gather(first_event(trigger(0)), first_event(trigger(1)))

    events = asyncio.run(both())
    for index, event in enumerate(events):
        assert event["status"] == "success", event
        assert event["token"] == submitted[index]["work"]["token"]
        assert sum(r["rows_in"] for r in event["results"]) == 10 * (index + 1)  # each cluster's own call
    # the triggerer process itself never joined a cluster
    import ray

    assert not ray.is_initialized()
    # and a call asked of the other cluster is not there: the answers did come from each cluster
    wrong = api.RayDriver.for_target(targets["ray_1"]).call("status", specs[0].core().to_dict(), work=submitted[0]["work"])
    assert wrong["state"] == "LOST"
