"""LLM generation with ``predictors.generation:TextGenerator`` (transformers' ``generate`` here).

Run it from the repository root: ``python docs/examples/generation.py [work_dir]`` (needs the
``llm`` extra: transformers). A real job needs a real model directory on every node; to stay
offline and fast this script first builds a tiny Llama with random weights and a
character-level tokenizer (so its text is gibberish, but every step is the real one: chat
template, left-padded batches, token counts, finish reasons). It then runs the job on a local
Ray (plan, the shards on a model replica, finalize: what ``batch_inference(spec)``'s three
tasks do in a DAG) and checks the sink. See docs/predictors.md#textgenerator and
docs/generation.md.
"""

from __future__ import annotations

import json
import os
import string
import sys
import tempfile

import pyarrow.dataset as ds

from airflow_batch_provider import BatchSpec
from airflow_batch_provider.core import api


def run_job(spec: BatchSpec) -> dict:
    """What the DAG's plan, shard and finalize tasks do, in this process, on a local Ray."""
    core = spec.core()
    api.connect()  # no address: starts a local Ray (a DAG's tasks use the `ray` connection's cluster)
    pool = api.ReplicaPool(core)  # the model replicas: each loads the model once
    try:
        pending = api.plan(core).pending  # the shards not committed yet
        for result in pool.result(pool.submit(pending, api.new_attempt())) if pending else []:
            print(f"shard {result['shard_id']}: {result['status']}, {result['rows_in']} rows in, "
                  f"{result['rows_out']} out, model load {result['model_load_seconds']:.1f} s")
    finally:
        pool.shutdown(force=True)  # in a DAG, finalize releases them (or they exit when idle)
    return api.finalize(core)  # checks every shard is committed, writes _SUCCESS


def build_tiny_llm(path: str) -> str:
    """A LlamaForCausalLM of 2 layers with random weights and a one-token-per-character
    tokenizer, saved as a Hugging Face model directory (what ``model=`` names)."""
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<unk>", "<s>", "</s>", "<pad>", *sorted(set(string.printable) - set("\x0b\x0c\r"))])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def main() -> None:
    work = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="abp-example-generate-")
    model = build_tiny_llm(os.path.join(work, "tiny-llm"))
    source = os.path.join(work, "articles.jsonl")
    texts = ["rain tomorrow", "markets up", None, "new bridge opens"]
    with open(source, "w") as handle:
        for i in range(24):
            handle.write(json.dumps({"id": i, "text": texts[i % 4]}) + "\n")

    spec = BatchSpec(
        source=source,
        sink=os.path.join(work, "summaries"),
        predictor="airflow_batch_provider.predictors.generation:TextGenerator",
        predictor_kwargs={"model": model, "prompt_template": "Summarise: {text}", "keep_columns": ["id"],
                          "max_new_tokens": 8, "temperature": 0.0, "engine": "transformers"},
        batch_size=8,
        rows_per_shard=12,
        num_cpus=1,
        num_replicas=1,
        num_gpus=0,  # 1 on a GPU node: the replica generates on CUDA (bfloat16)
    )
    manifest = run_job(spec)

    table = ds.dataset(spec.sink, format="parquet").to_table().sort_by("id")
    print(f"{manifest['rows_out']} rows in {spec.sink}, columns {table.column_names}")
    for row in table.slice(0, 4).to_pylist():
        print(row)
    assert table.column_names == ["id", "generated_text", "tokens_in", "tokens_out", "finish_reason"]
    for row in table.to_pylist():
        text = texts[row["id"] % 4]
        if text is None:  # a null prompt is never sent: nulls in every output column
            assert (row["generated_text"], row["tokens_in"], row["tokens_out"], row["finish_reason"]) == (None,) * 4, row
            continue
        assert row["tokens_in"] == len(f"Summarise: {text}") + 1  # one token per character, and <s>
        assert 1 <= row["tokens_out"] <= 8 and row["finish_reason"] in ("stop", "length"), row
        assert (row["finish_reason"] == "length") == (row["tokens_out"] == 8), row
    by_text = {}
    for row in table.to_pylist():  # greedy decoding: the same prompt gives the same text, in any batch
        by_text.setdefault(texts[row["id"] % 4], set()).add(row["generated_text"])
    assert all(len(answers) == 1 for answers in by_text.values()), by_text
    print("example ok")


if __name__ == "__main__":
    sys.exit(main())
