"""`python -m benchmarks.autoscaling`: the replica pool on an autoscaling Ray cluster, measured.

Ray's real autoscaler (v2; AUTOSCALE_V1=1: the v1 monitor) with its fake multi-node provider
(``tests/autoscaling_cluster.py``): a GPU node type of 1 CPU and 1 virtual GPU, 0 nodes at
first, at most AUTOSCALE_NODES (2) nodes, removed after AUTOSCALE_NODE_IDLE_S (6) s idle. A job
of AUTOSCALE_SHARDS (8) shards, each a few seconds of work (``SlowDoubler``), run by
AUTOSCALE_CALLERS (4) callers side by side (as mapped shard tasks would), after the plan step
started ``min_replicas=1``. Prints, as Markdown:

1. time from the plan (``ReplicaPool.start``) to each replica up, and to each node joined;
2. replicas (up / waiting for a node) and GPU nodes over time;
3. after the last shard, with no release: time until the idle replicas exit
   (``replica_idle_timeout_s`` = AUTOSCALE_REPLICA_IDLE_S, 5) and until the autoscaler removes
   the nodes; then the same with the job's end releasing its replicas (finalize);
4. time for a replica no node type can hold (4 GPUs) to fail.

The nodes are raylets on this machine: the times are Ray's and the autoscaler's own, without a
cloud VM's boot (minutes on a cloud): read them as the provider's share of the wait.
"""

from __future__ import annotations

import os
import queue
import shutil
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.autoscaling_cluster import AutoscalingRayCluster, gpu_node_type  # noqa: E402
from tests.helpers import make_spec, rows, write_jsonl  # noqa: E402

NODES = int(os.environ.get("AUTOSCALE_NODES", "2"))
NODE_IDLE_S = float(os.environ.get("AUTOSCALE_NODE_IDLE_S", "6"))
REPLICA_IDLE_S = float(os.environ.get("AUTOSCALE_REPLICA_IDLE_S", "5"))
SHARDS = int(os.environ.get("AUTOSCALE_SHARDS", "8"))
CALLERS = int(os.environ.get("AUTOSCALE_CALLERS", "4"))
V1 = os.environ.get("AUTOSCALE_V1") == "1"
#: node_wait_timeout_s of the infeasible replica: v1 publishes no verdict, so it waits this long
INFEASIBLE_WAIT_S = float(os.environ.get("AUTOSCALE_INFEASIBLE_WAIT_S", "30"))


def main() -> None:
    import ray

    from airflow_batch_provider.core.domain.commit import new_attempt
    from airflow_batch_provider.core.domain.jobs import plan_job
    from airflow_batch_provider.core.errors import RayWorkError, ResourcesUnavailableError
    from airflow_batch_provider.core.ray.connection import NAMESPACE
    from airflow_batch_provider.core.ray.pool import ReplicaPool

    def gpu_nodes() -> int:
        return sum(1 for node in ray.nodes() if node.get("Alive") and node["Resources"].get("GPU"))

    cluster = AutoscalingRayCluster(label="bench-autoscale", node_types={"gpu": gpu_node_type(max_workers=NODES)},
                                    idle_timeout_s=NODE_IDLE_S, autoscaler_v2=not V1)
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    work_dir = tempfile.mkdtemp(prefix="abp-bench-autoscale-")
    try:
        cluster.start()
        cluster.connect(NAMESPACE, log_to_driver=False)  # the autoscaler's own event lines stay out of the figures
        write_jsonl(os.path.join(work_dir, "in", "a.jsonl"), rows(100 * SHARDS))
        print(f"# Autoscaling figures (Ray {ray.__version__}, autoscaler {'v1' if V1 else 'v2'}, fake multi-node provider)\n")
        print(f"GPU node type: 1 CPU, 1 GPU, 0 to {NODES} nodes, idle_timeout {NODE_IDLE_S:g} s; job: {SHARDS} shards, "
              f"{CALLERS} callers, min_replicas=1, replica_idle_timeout_s={REPLICA_IDLE_S:g}.\n")
        for release in (False, True):
            run_job(ray, cluster, work_dir, release, gpu_nodes, ReplicaPool, plan_job, new_attempt)
        spec = make_spec(os.path.join(work_dir, "in"), os.path.join(work_dir, "out-4gpu"), num_gpus=4, num_cpus=1)
        pool = ReplicaPool(spec, node_wait_timeout_s=INFEASIBLE_WAIT_S)
        started = time.monotonic()
        try:
            pool.submit(plan_job(spec).pending[:1], new_attempt())
        except (ResourcesUnavailableError, RayWorkError) as err:
            print(f"## A replica no node type holds (num_gpus=4), node_wait_timeout_s={INFEASIBLE_WAIT_S:g}\n\n"
                  f"failed after {time.monotonic() - started:.1f} s ({type(err).__name__}): {err}")
        finally:
            pool.shutdown(force=True)
    finally:
        cluster.disconnect(saved)
        cluster.stop()
        shutil.rmtree(work_dir, ignore_errors=True)


def run_job(ray, cluster, work_dir, release, gpu_nodes, ReplicaPool, plan_job, new_attempt) -> None:
    label = "released at the job's end" if release else "left to their idle timeout"
    spec = make_spec(os.path.join(work_dir, "in"), os.path.join(work_dir, f"out-{release}"),
                     predictor="tests.predictors:SlowDoubler", predictor_kwargs={"sleep_s": 1.0},
                     num_gpus=1, num_cpus=1, min_replicas=1)
    pending = plan_job(spec).pending
    deadline = time.monotonic() + 120
    while gpu_nodes() and time.monotonic() < deadline:  # start from 0 GPU nodes
        time.sleep(0.5)
    pool = ReplicaPool(spec, idle_timeout_s=REPLICA_IDLE_S, node_wait_timeout_s=300)
    samples: list[tuple[float, int, int, int]] = []
    stop = threading.Event()
    started = time.monotonic()

    def sample() -> None:
        while not stop.is_set():
            try:
                states = pool.replica_states()
                up = sum(s == "ALIVE" for s in states.values())
                samples.append((time.monotonic() - started, up, len(states) - up, gpu_nodes()))
            except Exception as err:  # a node going away mid-question: ask again next time
                print(f"(sample failed: {type(err).__name__}: {err})", file=sys.stderr)
            stop.wait(0.5)

    threading.Thread(target=sample, daemon=True).start()
    pool.start(wanted=len(pending))
    todo: queue.Queue = queue.Queue()
    for shard in pending:
        todo.put(shard)

    def caller() -> None:
        while True:
            try:
                shard = todo.get_nowait()
            except queue.Empty:
                return
            pool.result(pool.submit([shard], new_attempt()))

    callers = [threading.Thread(target=caller) for _ in range(CALLERS)]
    for thread in callers:
        thread.start()
    for thread in callers:
        thread.join()
    done = time.monotonic() - started
    if release:
        pool.shutdown()
    deadline = time.monotonic() + 90
    while (pool.replica_states() or gpu_nodes()) and time.monotonic() < deadline:
        time.sleep(0.5)
    stop.set()
    time.sleep(0.6)
    states = pool.replica_states()  # the state the wait above ended on (the sampler may not have seen it)
    up = sum(s == "ALIVE" for s in states.values())
    samples.append((time.monotonic() - started, up, len(states) - up, gpu_nodes()))
    if gpu_nodes():  # say what keeps a node up
        from ray._private.state import actors

        alive = [(a["Name"], a["State"], a.get("Address", {}).get("NodeID", "")[:8]) for a in actors().values() if a["State"] != "DEAD"]
        print(f"(still up after 90 s: {gpu_nodes()} GPU node(s); actors not dead: {alive}; "
              f"available: {[n['NodeID'][:8] for n in ray.nodes() if n['Alive'] and n['Resources'].get('GPU')]} "
              f"{ray.available_resources()})\n")
    print(f"## Replicas {label}\n")
    firsts = {}
    for t, up, _waiting, nodes in samples:
        firsts.setdefault(("up", up), t)
        firsts.setdefault(("nodes", nodes), t)
    ups = ", ".join(f"{n}: {firsts[('up', n)]:.1f} s" for n in range(1, 1 + max(s[1] for s in samples)))
    joins = ", ".join(f"{n}: {firsts[('nodes', n)]:.1f} s" for n in range(1, 1 + max(s[3] for s in samples)))
    print(f"- from the plan (start) to replica up: {ups}")
    print(f"- from the plan to GPU node joined: {joins}")
    print(f"- all {len(pending)} shards done: {done:.1f} s")
    gone = next((t for t, up, waiting, _ in samples if t > done and up + waiting == 0), None)
    removed = next((t for t, _, _, nodes in samples if t > done and nodes == 0), None)
    print(f"- after the last shard: replicas gone {fmt(gone, done)}, GPU nodes removed {fmt(removed, done)}\n")
    print("| s | replicas up | replicas waiting for a node | GPU nodes |\n|---|---|---|---|")
    last = None
    for t, up, waiting, nodes in samples:
        if (up, waiting, nodes) != last:
            print(f"| {t:.1f} | {up} | {waiting} | {nodes} |")
            last = (up, waiting, nodes)
    print()
    pool.shutdown(force=True)


def fmt(at: float | None, done: float) -> str:
    return "not within 90 s" if at is None else f"{at - done:.1f} s"


if __name__ == "__main__":
    main()
