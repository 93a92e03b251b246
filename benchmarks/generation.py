"""`make bench-llm` (and `make bench`): LLM generation, a bare `generate` loop vs this provider.

The model is a tiny Llama with random weights built here (tests/tiny_llm.py; no download), on
CPU, greedy decoding. One invocation:

1. builds the model and a JSONL corpus of prompts (BENCH_LLM_ROWS, default 256, of varied
   lengths) and starts a Ray head of its own (benchmarks/run.py's ``RayHead``);
2. runs, each from a cold process, model load included: a bare loop (read JSONL, left-padded
   ``model.generate`` batch by batch, write Parquet), then this provider end to end
   (`airflow dags test` of a ``batch_inference`` DAG with ``TextGenerator``), then the bare
   loop again, so a drift in the machine's speed cancels in the bare loop's mean;
3. runs both on the same batches in one process, alternating (the predictor's own cost
   without Ray or Airflow, drift cancelled);
4. prints generated tokens/s both ways, whole run and in the model only, and the ratio.

On a CUDA machine with vLLM this still measures the transformers engine (``engine`` is pinned):
vLLM bare vs the provider is not measured here yet.
"""

from __future__ import annotations

import glob
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

WORK = os.environ.get("BENCH_LLM_DIR", os.path.join(ROOT, ".bench-llm"))
ROWS = int(os.environ.get("BENCH_LLM_ROWS", "256"))
BATCH = int(os.environ.get("BENCH_LLM_BATCH_SIZE", "32"))
ROWS_PER_SHARD = int(os.environ.get("BENCH_LLM_ROWS_PER_SHARD", "64"))
MAX_NEW_TOKENS = int(os.environ.get("BENCH_LLM_MAX_NEW_TOKENS", "32"))
HIDDEN = int(os.environ.get("BENCH_LLM_HIDDEN", "128"))
LAYERS = int(os.environ.get("BENCH_LLM_LAYERS", "4"))
CPUS = int(os.environ.get("BENCH_CPUS", str(min(2, os.cpu_count() or 1))))
PREDICTOR = "airflow_batch_provider.predictors.generation:TextGenerator"
TEMPLATE = "Summarise: {text}"


def log(message: str) -> None:
    print(f"[bench-llm] {message}", flush=True)


def kwargs(model: str) -> dict:
    return {"model": model, "prompt_template": TEMPLATE, "keep_columns": ["id"], "max_new_tokens": MAX_NEW_TOKENS,
            "engine": "transformers"}


def write_prompts(corpus: str) -> None:
    words = "the a river model shard batch ray token cloud quiet green table runs over under data".split()
    rng = random.Random(0)
    os.makedirs(corpus, exist_ok=True)
    for part in range(2):
        with open(f"{corpus}/prompts-{part}.jsonl", "w") as handle:
            for i in range(part * ROWS // 2, (part + 1) * ROWS // 2):
                text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 15)))
                handle.write(json.dumps({"id": i, "text": text}) + "\n")


def bare_loop(model_path: str, corpus: str, out: str) -> dict[str, float]:
    """What a user writes without the provider: tokenizer + ``generate`` per batch, Parquet out."""
    import pyarrow as pa
    import pyarrow.json as pj
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    eos = tokenizer.eos_token_id
    os.makedirs(out, exist_ok=True)
    writer = None
    tokens = 0
    model_seconds = 0.0
    for path in sorted(glob.glob(f"{corpus}/*.jsonl")):
        table = pj.read_json(path)
        for offset in range(0, table.num_rows, BATCH):
            batch = table.slice(offset, BATCH)
            prompts = [TEMPLATE.format(text=t) for t in batch.column("text").to_pylist()]
            tick = time.perf_counter()
            encoded = tokenizer(prompts, padding=True, return_tensors="pt")
            with torch.inference_mode():
                generated = model.generate(**encoded, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                           pad_token_id=tokenizer.pad_token_id)
            texts = []
            for row in generated[:, encoded["input_ids"].shape[1]:].tolist():
                stop = row.index(eos) if eos in row else None
                tokens += len(row) if stop is None else stop + 1
                texts.append(tokenizer.decode(row[:stop], skip_special_tokens=True))
            model_seconds += time.perf_counter() - tick
            result = pa.table({"id": batch.column("id"), "generated_text": pa.array(texts, pa.string())})
            writer = writer or pq.ParquetWriter(f"{out}/bare.parquet", result.schema)
            writer.write_table(result)
    writer.close()
    return {"seconds": time.perf_counter() - started, "model_seconds": model_seconds, "tokens": tokens}


def interleaved(model_path: str, corpus: str) -> dict[str, float]:
    """The predictor's own cost: one process, one model, each batch through a bare ``generate``
    and through ``TextGenerator.__call__`` in alternating order, so the machine's drift (other
    jobs on shared cores) falls on both sides alike."""
    import pyarrow.json as pj
    import torch
    from transformers import AutoTokenizer

    from airflow_batch_provider.core.execution.batches import from_batch, to_batch
    from airflow_batch_provider.predictors.generation import TextGenerator

    generator = TextGenerator(**kwargs(model_path))
    model = generator.engine.model  # the same weights both ways
    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    eos = tokenizer.eos_token_id
    seconds = {"bare": 0.0, "provider": 0.0}
    tokens = {"bare": 0, "provider": 0}

    def bare(batch):
        encoded = tokenizer([TEMPLATE.format(text=t) for t in batch.column("text").to_pylist()],
                            padding=True, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**encoded, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        count = 0
        for row in out[:, encoded["input_ids"].shape[1]:].tolist():
            stop = row.index(eos) if eos in row else None
            count += len(row) if stop is None else stop + 1
            tokenizer.decode(row[:stop], skip_special_tokens=True)
        return count

    def ours(batch):
        return sum(from_batch(generator(to_batch(batch, "numpy")), "numpy").column("tokens_out").to_pylist())

    warm = pj.read_json(sorted(glob.glob(f"{corpus}/*.jsonl"))[0]).slice(0, BATCH)
    bare(warm), ours(warm)  # first calls pay one-off set-up: not counted
    step = 0
    for path in sorted(glob.glob(f"{corpus}/*.jsonl")):
        table = pj.read_json(path)
        for offset in range(0, table.num_rows, BATCH):
            batch = table.slice(offset, BATCH)
            for way in (("bare", "provider") if step % 2 == 0 else ("provider", "bare")):
                tick = time.perf_counter()
                tokens[way] += bare(batch) if way == "bare" else ours(batch)
                seconds[way] += time.perf_counter() - tick
            step += 1
    return {"bare_seconds": seconds["bare"], "provider_seconds": seconds["provider"],
            "bare_tokens": tokens["bare"], "provider_tokens": tokens["provider"]}


def provider(model_path: str, corpus: str, sink: str) -> dict[str, float]:
    """``airflow dags test`` of a batch_inference DAG with ``TextGenerator`` on the bench's Ray head."""
    import pyarrow.dataset as ds

    from airflow_batch_provider import BatchSpec
    from airflow_batch_provider.core.events import EventKind, parse_events
    from tests.integration.dagtest import DagTester

    tester = DagTester(f"{WORK}/airflow", dag_id="abp_bench_llm")
    tester.env["RAY_ADDRESS"] = os.environ["RAY_ADDRESS"]  # the bench's head, not a Ray of its own per run
    spec = BatchSpec(source=f"{corpus}/*.jsonl", sink=sink, predictor=PREDICTOR, predictor_kwargs=kwargs(model_path),
                     batch_size=BATCH, rows_per_shard=ROWS_PER_SHARD, num_cpus=CPUS, num_replicas=1)
    started = time.perf_counter()
    run = tester.run(spec)
    wall = time.perf_counter() - started
    open(f"{WORK}/provider.log", "w").write(run.output)
    if run.state != "success":
        sys.exit(f"the DAG run failed; see {WORK}/provider.log")
    manifest = json.load(open(f"{sink}/_SUCCESS"))
    table = ds.dataset(sink, format="parquet").to_table(columns=["tokens_out"])
    done = [e for e in parse_events(run.output, EventKind.SHARD_DONE) if e["status"] == "computed"]
    return {"seconds": manifest["elapsed_seconds"], "wall": wall, "tokens": int(table.column("tokens_out").to_numpy().sum()),
            "model_seconds": sum(e["model_seconds"] for e in done), "rows": manifest["rows_out"]}


def in_fresh_process(function: str, *args: str) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {ROOT!r}); from benchmarks import generation; "
            f"print('RESULT', json.dumps(generation.{function}(*{args!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        sys.exit(f"{function} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    from benchmarks.run import RayHead
    from tests.tiny_llm import build_tiny_llm

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    shutil.rmtree(WORK, ignore_errors=True)
    model = build_tiny_llm(f"{WORK}/model", hidden=HIDDEN, layers=LAYERS)
    corpus = f"{WORK}/corpus"
    write_prompts(corpus)
    log(f"tiny Llama (hidden {HIDDEN}, {LAYERS} layers, random weights), {ROWS} prompts, batch {BATCH}, "
        f"max_new_tokens {MAX_NEW_TOKENS}, {ROWS_PER_SHARD} rows/shard, {CPUS} CPUs, greedy, CPU")
    same = in_fresh_process("interleaved", model, corpus)
    head = RayHead(f"/tmp/abp-bench-llm-ray-{os.getpid()}")
    head.start()
    bare = []
    try:
        bare.append(in_fresh_process("bare_loop", model, corpus, f"{WORK}/bare-0"))
        log(f"bare loop {bare[-1]['seconds']:.1f} s, {bare[-1]['tokens']} tokens")
        prov = in_fresh_process("provider", model, corpus, f"{WORK}/provider")
        log(f"provider {prov['seconds']:.1f} s plan->finalize ({prov['wall']:.1f} s command), {prov['tokens']} tokens")
        bare.append(in_fresh_process("bare_loop", model, corpus, f"{WORK}/bare-1"))
        log(f"bare loop {bare[-1]['seconds']:.1f} s, {bare[-1]['tokens']} tokens")
    finally:
        head.stop()
    assert prov["rows"] == ROWS
    if prov["tokens"] != bare[0]["tokens"]:  # greedy on the same batches: the same generations both ways
        log(f"token counts differ: provider {prov['tokens']}, bare {bare[0]['tokens']} (each side's rate uses its own)")
    b_s = statistics.mean(b["seconds"] for b in bare)
    b_m = statistics.mean(b["model_seconds"] for b in bare)
    tokens, p_tokens = bare[0]["tokens"], prov["tokens"]
    rows = [
        ("bare generate loop (model load included)", b_s, tokens / b_s, 1.0),
        ("provider, plan->finalize", prov["seconds"], p_tokens / prov["seconds"], (p_tokens / prov["seconds"]) / (tokens / b_s)),
        ("provider, whole dags-test command", prov["wall"], p_tokens / prov["wall"], (p_tokens / prov["wall"]) / (tokens / b_s)),
        ("bare loop, in generate only", b_m, tokens / b_m, 1.0),
        ("provider, in the predictor only", prov["model_seconds"], p_tokens / prov["model_seconds"],
         (p_tokens / prov["model_seconds"]) / (tokens / b_m)),
    ]
    print(f"{'way':<44}{'seconds':>9}{'tokens/s':>11}{'x bare':>8}")
    for name, seconds, rate, ratio in rows:
        print(f"{name:<44}{seconds:>9.1f}{rate:>11.1f}{ratio:>8.3f}")
    b_rate = same["bare_tokens"] / same["bare_seconds"]
    p_rate = same["provider_tokens"] / same["provider_seconds"]
    print(f"{'one process, batches alternated: bare generate':<44}{same['bare_seconds']:>9.1f}{b_rate:>11.1f}{1:>8.3f}")
    print(f"{'one process, batches alternated: predictor':<44}{same['provider_seconds']:>9.1f}{p_rate:>11.1f}"
          f"{p_rate / b_rate:>8.3f}")
    runs = ", ".join(f"{b['seconds']:.1f} s" for b in bare)
    print(f"(bare loop runs: {runs}; {tokens} tokens generated)")


if __name__ == "__main__":
    main()
