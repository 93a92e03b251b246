"""`make bench-gpu`: MiniLM on CUDA, a bare torch loop vs this provider on the same GPU.

On a machine without a CUDA GPU (CI, laptops) it says so and exits 0. Otherwise it runs the
bare loop and the provider (`airflow dags test`, `num_gpus=1`, Ray head started first) over
the same generated corpus and prints rows/s and the ratio (target >= 0.90x).
"""

from __future__ import annotations

import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("bench-gpu: no CUDA GPU visible to torch on this machine; nothing to measure (skipped).")
        return 0
    os.environ.setdefault("BENCH_ROWS", "100000")
    os.environ.setdefault("BENCH_BATCH_SIZE", "512")
    os.environ.setdefault("BENCH_ROWS_PER_SHARD", "25000")
    os.environ.setdefault("BENCH_DIR", os.path.join(ROOT, ".bench-gpu"))
    os.environ["BATCH_DEMO_NUM_GPUS"] = "1"
    from benchmarks import run
    from scripts.make_corpus import write_corpus

    shutil.rmtree(run.WORK, ignore_errors=True)
    corpus = f"{run.WORK}/corpus"
    write_corpus(corpus, run.ROWS, files=4)
    print(f"GPU: {torch.cuda.get_device_name(0)}; {run.ROWS} rows, batch {run.BATCH}, {run.ROWS_PER_SHARD} rows/shard")
    bare = run.bare_loop(corpus, f"{run.WORK}/bare")["seconds"]
    head = run.RayHead(f"/tmp/abp-bench-gpu-{os.getpid()}")
    head.start()
    try:
        provider, wall, log_text, _ = run.provider(corpus, f"{run.WORK}/provider", head)
    finally:
        head.stop()
    overheads = run.shard_overheads(log_text)
    print(f"{'way':<44}{'seconds':>10}{'rows/s':>11}{'x bare':>9}")
    print(f"{'bare torch loop (cuda, model load included)':<44}{bare:>10.1f}{run.ROWS / bare:>11.1f}{1:>9.3f}")
    print(f"{'provider (plan->finalize, num_gpus=1)':<44}{provider:>10.1f}{run.ROWS / provider:>11.1f}{bare / provider:>9.3f}")
    print(f"{'provider, whole dags-test command':<44}{wall:>10.1f}{run.ROWS / wall:>11.1f}{bare / wall:>9.3f}")
    if overheads:
        print(f"median per-shard overhead: {sorted(overheads)[len(overheads) // 2]:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
