"""Write a synthetic JSONL text corpus (``{"id", "text"}`` per line) for the demo and benchmarks."""

from __future__ import annotations

import argparse
import json
import os
import random

_WORDS = (
    "airflow ray shard model batch vector embedding query search index retrieval document "
    "sentence language neural network gpu cluster storage parquet bucket scheduler worker "
    "pipeline dataset token inference latency throughput checkpoint resume commit failure "
    "river mountain coffee garden library music market harbor winter science history city"
).split()


def write_corpus(directory: str, rows: int, files: int = 4, seed: int = 7) -> list[str]:
    os.makedirs(directory, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    per_file = -(-rows // files)
    for index in range(files):
        path = os.path.join(directory, f"corpus-{index:03d}.jsonl")
        with open(path, "w") as handle:
            for row in range(index * per_file, min(rows, (index + 1) * per_file)):
                words = rng.choices(_WORDS, k=rng.randint(8, 40))
                handle.write(json.dumps({"id": row, "text": " ".join(words).capitalize() + "."}) + "\n")
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("directory")
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--files", type=int, default=4)
    args = parser.parse_args()
    paths = write_corpus(args.directory, args.rows, args.files)
    print(f"wrote {args.rows} rows in {len(paths)} files under {args.directory}")


if __name__ == "__main__":
    main()
