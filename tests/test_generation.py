"""The generation predictor on a tiny random-weight Llama built in the test (transformers engine, CPU).

The batches go through the provider's own conversions (``to_batch`` / ``from_batch``), so each
batch format is what a replica would hand the predictor and get back.
"""

from __future__ import annotations

import importlib.util
import json

import pyarrow as pa
import pytest

from airflow_batch_provider.core import counters
from airflow_batch_provider.core.execution.batches import from_batch, to_batch
from airflow_batch_provider.predictors.generation import TextGenerator
from tests.tiny_llm import REPEAT_CHAR, build_tiny_llm, build_tokenizer

PROMPTS = ["hello", None, "a much longer prompt than the others", "", "x"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_llm")
    return {b: build_tiny_llm(root / b, behaviour=b) for b in ("random", "stop", "repeat")} | {
        "no_chat": build_tiny_llm(root / "no_chat", chat_template=None)
    }


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def table(**columns):
    return pa.table({"id": list(range(len(next(iter(columns.values()))))), **columns})


def run(predictor, source: pa.Table, batch_format: str) -> pa.Table:
    return from_batch(predictor(to_batch(source, batch_format)), batch_format)


@pytest.mark.parametrize("batch_format", ["numpy", "pandas", "pyarrow"])
def test_prompt_column_in_every_batch_format(models, tokenizer, batch_format):
    generator = TextGenerator(models["random"], max_new_tokens=6)
    assert generator.engine_name == "transformers"  # no vLLM / CUDA here
    out = run(generator, table(prompt=PROMPTS), batch_format)
    assert out.column_names == ["id", "generated_text", "tokens_in", "tokens_out", "finish_reason"]
    assert out.column("id").to_pylist() == list(range(len(PROMPTS)))
    rows = out.to_pylist()
    assert rows[1] == {"id": 1, "generated_text": None, "tokens_in": None, "tokens_out": None, "finish_reason": None}
    for prompt, row in zip(PROMPTS, rows, strict=True):
        if prompt is None:
            continue
        assert row["tokens_in"] == len(tokenizer(prompt)["input_ids"]) == len(prompt) + 1  # <s> + one per char
        assert row["finish_reason"] in ("stop", "length")
        assert 1 <= row["tokens_out"] <= 6
        if row["finish_reason"] == "length":
            assert row["tokens_out"] == 6 and len(row["generated_text"]) <= 6
    # the same rows, whatever the format
    assert rows == run(generator, table(prompt=PROMPTS), "numpy").to_pylist()


def test_left_padding_gives_each_row_what_it_gets_alone(models):
    generator = TextGenerator(models["random"], max_new_tokens=8)
    prompts = [p for p in PROMPTS if p]
    together = run(generator, table(prompt=prompts), "pyarrow").column("generated_text").to_pylist()
    alone = [run(generator, table(prompt=[p]), "pyarrow").column("generated_text")[0].as_py() for p in prompts]
    assert together == alone
    assert len(set(together)) > 1  # random weights: prompts lead somewhere different


def test_finish_reason_stop_and_length(models):
    stopped = run(TextGenerator(models["stop"], max_new_tokens=5), table(prompt=["hi", "there"]), "numpy")
    assert stopped.select(["generated_text", "tokens_out", "finish_reason"]).to_pylist() == [
        {"generated_text": "", "tokens_out": 1, "finish_reason": "stop"}
    ] * 2
    cut = run(TextGenerator(models["repeat"], max_new_tokens=5), table(prompt=["hi", "a longer one"]), "numpy")
    assert cut.select(["generated_text", "tokens_out", "finish_reason"]).to_pylist() == [
        {"generated_text": REPEAT_CHAR * 5, "tokens_out": 5, "finish_reason": "length"}
    ] * 2


def test_tokens_in_and_out_are_reported_as_the_shards_counters(models):
    """What the runner collects for the shard (docs/counting.md): the sums of the token columns."""
    with counters.collecting() as tally:
        out = run(TextGenerator(models["repeat"], max_new_tokens=5), table(prompt=["hi", None, "a longer one"]), "numpy")
    assert tally.totals() == {"tokens_in": 3 + 13, "tokens_out": 10}  # <s> + one per char; 5 each, the null none
    assert tally.totals()["tokens_in"] == sum(filter(None, out.column("tokens_in").to_pylist()))


def test_template_over_columns_nulls_and_keep_columns(models, tokenizer):
    generator = TextGenerator(
        models["repeat"], prompt_template="Summarise: {text} ({lang})", keep_columns=["id", "lang"], max_new_tokens=2
    )
    source = table(text=["one", None, "three"], lang=["en", "fr", None])
    for batch_format in ("numpy", "pandas", "pyarrow"):
        out = run(generator, source, batch_format).to_pylist()
        assert [r["lang"] for r in out] == ["en", "fr", None]
        assert [r["tokens_in"] for r in out] == [len(tokenizer("Summarise: one (en)")["input_ids"]), None, None]
        assert [r["generated_text"] for r in out] == [REPEAT_CHAR * 2, None, None]


def test_chat_prompt_and_messages_use_the_chat_template(models, tokenizer):
    rendered = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        tokenize=False, add_generation_prompt=True,
    )
    assert rendered == "<s><|system|>Be brief.\n<|user|>hi\n<|assistant|>"
    expected = len(tokenizer(rendered, add_special_tokens=False)["input_ids"])  # the template has its own <s>
    chat = TextGenerator(models["repeat"], chat=True, system_prompt="Be brief.", max_new_tokens=3)
    out = run(chat, table(prompt=["hi", None]), "pandas").to_pylist()
    assert [r["tokens_in"] for r in out] == [expected, None]
    assert out[0]["generated_text"] == REPEAT_CHAR * 3

    messages = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}], None]
    by_messages = TextGenerator(models["repeat"], messages_column="messages", max_new_tokens=3)
    for batch_format in ("numpy", "pandas", "pyarrow"):  # a list<struct> column
        assert run(by_messages, table(messages=messages), batch_format).to_pylist() == out
    as_json = [json.dumps(messages[0]), None]  # or JSON text
    assert run(by_messages, table(messages=as_json), "numpy").to_pylist() == out


def test_sampling_is_reproducible_with_a_seed(models):
    source = table(prompt=["hello", "world", "again"])
    first = run(TextGenerator(models["random"], temperature=1.0, top_p=0.9, seed=7, max_new_tokens=12), source, "numpy")
    again = run(TextGenerator(models["random"], temperature=1.0, top_p=0.9, seed=7, max_new_tokens=12), source, "numpy")
    other = run(TextGenerator(models["random"], temperature=1.0, top_p=0.9, seed=8, max_new_tokens=12), source, "numpy")
    assert first.to_pylist() == again.to_pylist()
    assert first.column("generated_text").to_pylist() != other.column("generated_text").to_pylist()


def test_clear_errors(models):
    with pytest.raises(ValueError, match="no chat template"):
        TextGenerator(models["no_chat"], chat=True)
    with pytest.raises(ValueError, match="name each column"):
        TextGenerator(models["random"], prompt_template="Summarise: {}")
    with pytest.raises(ValueError, match="engine="):
        TextGenerator(models["random"], engine="tgi")
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(ImportError, match=r"\[llm-vllm\]"):
            TextGenerator(models["random"], engine="vllm")
    with pytest.raises(KeyError, match="has no column 'prompt'"):
        TextGenerator(models["random"])(to_batch(table(text=["a"]), "numpy"))
    with pytest.raises(KeyError, match="keep_columns names 'row'"):
        TextGenerator(models["random"], keep_columns=["row"])(to_batch(table(prompt=["a"]), "pandas"))
