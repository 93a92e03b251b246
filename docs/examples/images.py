"""Image classification with ``predictors.images:ImageClassifier`` over a column of image paths.

Run it from the repository root: ``python docs/examples/images.py [work_dir]`` (needs the
``images`` extra: transformers and Pillow). A real job names a real model (a ViT, ConvNeXt,
... directory on every node); to stay offline and fast this script first builds a tiny ViT with
random weights and its image processor (so its labels mean nothing, but every step is the
real one: reading, decoding on threads, resizing, the forward pass, top-k). It writes a few
PNG and JPEG files, one file that is not an image and one null row, runs the job on a local
Ray (plan, the shards on a model replica, finalize: what ``batch_inference(spec)``'s three
tasks do in a DAG) and checks the sink and ``_rejected/``. See docs/images.md.
"""

from __future__ import annotations

import glob
import io
import json
import os
import sys
import tempfile

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from airflow_batch_provider import BatchSpec
from airflow_batch_provider.core import api

LABELS = ["cat", "dog", "bird", "fish", "horse"]


def run_job(spec: BatchSpec) -> dict:
    """What the DAG's plan, shard and finalize tasks do, in this process, on a local Ray."""
    core = spec.core()
    api.connect()  # no address: starts a local Ray (a DAG's tasks use the `ray` connection's cluster)
    pool = api.ReplicaPool(core)  # the model replicas: each loads the model once
    try:
        pending = api.plan(core).pending  # the shards not committed yet
        for result in pool.result(pool.submit(pending, api.new_attempt())) if pending else []:
            print(f"shard {result['shard_id']}: {result['status']}, {result['rows_in']} rows in, "
                  f"{result['rows_out']} out, {result['rows_rejected']} rejected")
    finally:
        pool.shutdown(force=True)  # in a DAG, finalize releases them (or they exit when idle)
    return api.finalize(core)  # checks every shard is committed, writes _SUCCESS


def build_tiny_vit(path: str) -> str:
    """A 2-layer ViTForImageClassification with random weights for 32x32 images, and a PIL
    image processor, saved as a Hugging Face model directory (what ``model=`` names)."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
                       label2id={name: i for i, name in enumerate(LABELS)})
    torch.manual_seed(0)
    ViTForImageClassification(config).eval().save_pretrained(path)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def write_image(path: str, seed: int) -> None:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG" if path.endswith(".jpg") else "PNG")
    with open(path, "wb") as handle:
        handle.write(buffer.getvalue())


def main() -> None:
    work = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="abp-example-images-")
    model = build_tiny_vit(os.path.join(work, "tiny-vit"))
    images = os.path.join(work, "photos")
    os.makedirs(images, exist_ok=True)
    rows = []
    for i in range(16):
        name = f"{i:03d}.{'jpg' if i % 2 else 'png'}"
        if i == 5:
            with open(os.path.join(images, name), "wb") as handle:
                handle.write(b"not an image at all")  # a bad row: rejected, the shard goes on
        else:
            write_image(os.path.join(images, name), i)
        rows.append({"id": i, "file": None if i == 9 else name})  # a null: null labels and scores
    os.makedirs(os.path.join(work, "in"), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(work, "in", "photos.parquet"), row_group_size=8)

    spec = BatchSpec(
        source=os.path.join(work, "in", "photos.parquet"),
        sink=os.path.join(work, "labels"),
        predictor="airflow_batch_provider.predictors.images:ImageClassifier",
        predictor_kwargs={"model": model, "image_column": "file", "root": images,  # paths relative to root
                          "keep_columns": ["id"], "top_k": 2, "decode_threads": 2, "model_batch_size": 4},
        bad_rows="skip",  # an unreadable image goes to _rejected/, not the whole shard
        batch_size=8,
        rows_per_shard=8,
        num_cpus=1,
        num_replicas=1,
        num_gpus=0,  # 1 on a GPU node: the replica runs on CUDA in float16
    )
    manifest = run_job(spec)

    table = ds.dataset(spec.sink, format="parquet").to_table().sort_by("id")
    print(f"{manifest['rows_out']} rows in {spec.sink}, columns {table.column_names}")
    for row in table.slice(0, 3).to_pylist():
        print(row)
    assert table.column_names == ["id", "labels", "scores"]
    assert table.column("id").to_pylist() == [i for i in range(16) if i != 5]
    for row in table.to_pylist():
        if row["id"] == 9:
            assert (row["labels"], row["scores"]) == (None, None), row
            continue
        assert len(row["labels"]) == 2 and set(row["labels"]) <= set(LABELS), row
        assert row["scores"][0] >= row["scores"][1] and 0 < sum(row["scores"]) <= 1, row
    rejected = [json.loads(line) for path in glob.glob(os.path.join(spec.sink, "_rejected", "*.jsonl")) for line in open(path)]
    print("rejected:", rejected[0]["error"])
    assert [r["row"]["id"] for r in rejected] == [5] and "cannot decode" in rejected[0]["error"], rejected
    assert (manifest["rows_in"], manifest["rows_out"], manifest["rows_rejected"]) == (16, 15, 1), manifest
    print("example ok")


if __name__ == "__main__":
    sys.exit(main())
