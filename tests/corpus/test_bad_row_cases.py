"""Bad-input corpus, part B: the bad-row policy, clear errors, and input pinned while read.

Every case runs a real job (plan, every shard through ``ShardRunner``, finalize) on real
files, then asserts the exact outcome: the rows the sink reads back (``read_back``: pyarrow,
pandas and DuckDB agree), the exact rows in ``{sink}/_rejected/``, or the exact error text.
"""

from __future__ import annotations

import base64
import functools
import glob
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from airflow_batch_provider.core.domain.commit import new_attempt
from airflow_batch_provider.core.domain.jobs import finalize_job, plan_job
from airflow_batch_provider.core.domain.layout import JobStorage
from airflow_batch_provider.core.errors import (
    BadRowLimitError,
    InputChangedError,
    InputDataError,
    InputEncodingError,
    PredictorFailedError,
    PredictorOutputError,
)
from airflow_batch_provider.core.execution.runner import ShardRunner
from airflow_batch_provider.core.spec import JobSpec
from tests.corpus.readback import read_back
from tests.helpers import ROOT, make_spec, write_jsonl, write_parquet

# -- helpers ------------------------------------------------------------------------------
#: The spec of this module's cases: ``make_spec``'s, in shards of 1,000 rows and batches of 16.
spec_for = functools.partial(make_spec, rows_per_shard=1000, batch_size=16)


def run_job(spec: JobSpec, storage_options: dict | None = None) -> dict:
    """Plan, run every pending shard in this process, finalize; returns ``_SUCCESS``."""
    storage = JobStorage.for_spec(spec, storage_options)
    runner = ShardRunner(spec, storage_options)
    for shard in plan_job(spec, storage).pending:
        runner.run(shard, new_attempt())
    return finalize_job(spec, JobStorage.for_spec(spec, storage_options))


def rejected(sink: str) -> list[dict]:
    """Every rejected row of the sink, in file and line order."""
    records = []
    for path in sorted(glob.glob(os.path.join(sink, "_rejected", "*.jsonl"))):
        with open(path, encoding="utf-8") as handle:
            records.extend(json.loads(line) for line in handle)
    return sorted(records, key=lambda r: (r["file"], r.get("line", r.get("row_index"))))


def sink_rows(sink: str, fmt: str = "parquet") -> list[dict]:
    return sorted(read_back(sink, fmt).to_pylist(), key=lambda r: r["id"])


def written(sink: str) -> list[str]:
    """What a failed job left that readers could see: parts, rejected files, sentinels."""
    found = glob.glob(os.path.join(sink, "part-*")) + glob.glob(os.path.join(sink, "_rejected", "*.jsonl"))
    return sorted(found + glob.glob(os.path.join(sink, "_checkpoint", "shards", "*.json")))


def write_lines(path: str, body: bytes) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(body)
    return path


def doubled(ids) -> list[dict]:
    return [{"id": i, "value": i * 0.5 * 2} for i in ids]


MALFORMED = b'{"id": 0, "value": 0.0}\n{"id": 1, "value": 0.5}\n{"id": 2, "value": \n{"id": 3, "value": 1.5}\n'


# -- malformed JSON -------------------------------------------------------------------------
def test_malformed_line_fails_by_default_naming_file_and_line(tmp_path):
    src = write_lines(str(tmp_path / "in" / "a.jsonl"), MALFORMED)
    spec = spec_for(src, str(tmp_path / "out"))
    with pytest.raises(InputDataError) as err:
        run_job(spec)
    assert str(err.value) == (
        f"{src}: line 3 is not valid JSON (Expecting value: line 1 column 20 (char 19)); fix or remove that "
        "line and run again (or set bad_rows='skip' to reject such lines)"
    )
    assert written(spec.sink_root) == []


def test_malformed_line_is_rejected_under_skip(tmp_path):
    src = write_lines(str(tmp_path / "in" / "a.jsonl"), MALFORMED)
    spec = spec_for(src, str(tmp_path / "out"), bad_rows="skip")
    manifest = run_job(spec)
    assert sink_rows(spec.sink_root) == doubled([0, 1, 3])
    [record] = rejected(spec.sink_root)
    assert record["raw"] == '{"id": 2, "value": '
    assert (record["file"], record["line"], record["stage"]) == (src, 3, "read")
    assert record["error"].startswith(f"{src}: line 3 is not valid JSON")
    assert (manifest["rows_in"], manifest["rows_out"], manifest["rows_rejected"]) == (4, 3, 1)
    [part] = manifest["parts"]
    assert part["rows_rejected"] == 1 and part["rejected"] == f"{part['shard_id']}.jsonl"
    sentinel = json.load(open(os.path.join(spec.checkpoint_root, "shards", f"{part['shard_id']}.json")))
    assert sentinel["rows_rejected"] == 1


def test_resume_false_deletes_the_earlier_rejected_rows(tmp_path):
    src = write_lines(str(tmp_path / "in" / "a.jsonl"), MALFORMED)
    spec = spec_for(src, str(tmp_path / "out"), bad_rows="skip")
    run_job(spec)
    assert len(rejected(spec.sink_root)) == 1
    write_lines(src, MALFORMED.replace(b'"value": \n', b'"value": 1.0}\n'))
    manifest = run_job(spec_for(src, str(tmp_path / "out"), bad_rows="skip", resume=False))
    assert rejected(spec.sink_root) == [] and manifest["rows_rejected"] == 0
    assert sink_rows(spec.sink_root) == doubled([0, 1, 2, 3])


def test_switching_a_failed_job_to_skip_keeps_committed_shards(tmp_path):
    write_jsonl(str(tmp_path / "in" / "a.jsonl"), [{"id": i, "value": i * 0.5} for i in range(10)])
    write_lines(str(tmp_path / "in" / "b.jsonl"), MALFORMED.replace(b'"id": 0', b'"id": 10').replace(b'"id": 1,', b'"id": 11,')
                .replace(b'"id": 3', b'"id": 13'))
    spec = spec_for(str(tmp_path / "in"), str(tmp_path / "out"), source_format="jsonl")
    with pytest.raises(InputDataError, match="b.jsonl: line 3 is not valid JSON"):
        run_job(spec)
    assert len(glob.glob(os.path.join(spec.sink_root, "part-*"))) == 1  # a.jsonl committed
    skip = spec_for(str(tmp_path / "in"), str(tmp_path / "out"), source_format="jsonl", bad_rows="skip")
    assert skip.fingerprint == spec.fingerprint
    plan = plan_job(skip)
    assert (plan.committed, len(plan.pending)) == (1, 1)
    run_job(skip)
    assert sink_rows(spec.sink_root) == doubled(range(10)) + [{"id": 10, "value": 0.0}, {"id": 11, "value": 1.0}, {"id": 13, "value": 3.0}]
    assert [r["line"] for r in rejected(spec.sink_root)] == [3]


# -- line endings, BOM, blank lines, trailing newline --------------------------------------
def test_crlf_line_endings_read_as_plain_lines(tmp_path):
    body = b'{"id": 0, "value": 0.0, "text": "a"}\r\n{"id": 1, "value": 0.5, "text": "b"}\r\n'
    src = write_lines(str(tmp_path / "in" / "a.jsonl"), body)
    spec = spec_for(src, str(tmp_path / "out"), predictor="tests.predictors:ArrowPassthrough", batch_format="pyarrow")
    run_job(spec)
    assert sink_rows(spec.sink_root) == [{"id": 0, "value": 0.0, "text": "a"}, {"id": 1, "value": 0.5, "text": "b"}]


def test_crlf_bad_line_is_rejected_without_its_carriage_return(tmp_path):
    body = b'{"id": 0, "value": 0.0}\r\nnot json\r\n{"id": 2, "value": 1.0}\r\n'
    src = write_lines(str(tmp_path / "in" / "a.jsonl"), body)
    spec = spec_for(src, str(tmp_path / "out"), bad_rows="skip")
    run_job(spec)
    assert sink_rows(spec.sink_root) == doubled([0, 2])
    assert [(r["line"], r["raw"]) for r in rejected(spec.sink_root)] == [(2, "not json")]


def test_utf8_byte_order_mark_is_not_part_of_the_first_key(tmp_path):
    src = write_lines(str(tmp_path / "in" / "a.jsonl"), b'\xef\xbb\xbf{"id": 0, "value": 0.0}\n{"id": 1, "value": 0.5}\n')
    spec = spec_for(src, str(tmp_path / "out"))
    run_job(spec)
    assert sink_rows(spec.sink_root) == doubled([0, 1])


def test_blank_lines_are_not_rows_and_keep_line_numbers(tmp_path):
    body = b'\n{"id": 0, "value": 0.0}\n   \n\n{"id": 1, "value": 0.5}\n{oops}\n\n'
    src = write_lines(str(tmp_path / "in" / "a.jsonl"), body)
    spec = spec_for(src, str(tmp_path / "out"), bad_rows="skip")
    manifest = run_job(spec)
    assert sink_rows(spec.sink_root) == doubled([0, 1])
    assert [(r["line"], r["raw"]) for r in rejected(spec.sink_root)] == [(6, "{oops}")]
    assert (manifest["rows_in"], manifest["rows_rejected"]) == (3, 1)


def test_last_line_without_newline_is_a_row(tmp_path):
    src = write_jsonl(str(tmp_path / "in" / "a.jsonl"), [{"id": i, "value": i * 0.5} for i in range(5)], trailing_newline=False)
    spec = spec_for(src, str(tmp_path / "out"), rows_per_shard=2)
    manifest = run_job(spec)
    assert sink_rows(spec.sink_root) == doubled(range(5))
    assert manifest["shards"] == 3


# -- a line holding other than one object (issue 19 item 2) ------------------------------------
def _row(i: int) -> str:
    return json.dumps({"id": i, "value": i * 0.5})


_PREDICT_FAILS = _row(99)  # the predictor raises on id 99: a bad row found after reading, by its line
_TWO = {"space": _row(11) + " " + _row(12), "none": _row(11) + _row(12)}

# (lines, separator, final newline, bad lines in order, ids kept); in each, Arrow's row count
# equals the number of physical lines, blank ones included, which once let the block through.
LINE_CASES = {
    "two_objects_blank_after": ([_row(10), _TWO["space"], "", _row(13), _PREDICT_FAILS], b"\n", True, [2, 5], [10, 13]),
    "two_objects_no_space_blank_before": (["", _row(10), _TWO["none"], _row(13), _PREDICT_FAILS], b"\n", True, [3, 5], [10, 13]),
    "crlf": ([_row(10), _TWO["space"], "", _row(13), _PREDICT_FAILS], b"\r\n", True, [2, 5], [10, 13]),
    "several_blank_lines": ([_row(10), "", "  ", _row(11) + " " + _row(12) + " " + _row(13), _PREDICT_FAILS], b"\n", True, [4, 5], [10]),
    "last_line_without_newline": ([_row(10), "", _PREDICT_FAILS, _TWO["space"]], b"\n", False, [3, 4], [10]),
    "null_line": ([_row(10), "null", _PREDICT_FAILS], b"\n", True, [2, 3], [10]),
    "object_across_two_lines": (['{"id": 10, "value":', "5.0}", _TWO["space"], _PREDICT_FAILS, _row(15)], b"\n", True, [1, 2, 3, 4], [15]),
}


def _line_case(tmp_path, name: str, **kw):
    lines, sep, final, bad, kept = LINE_CASES[name]
    body = sep.join(line.encode() for line in lines) + (sep if final else b"")
    src = write_lines(str(tmp_path / "in" / "a.jsonl"), body)
    marker = tmp_path / "fail-marker"
    marker.write_text("")
    kwargs = {"fail_marker": str(marker), "fail_mod": 99}
    spec = spec_for(src, str(tmp_path / "out"), predictor_kwargs=kwargs, **kw)
    return src, spec, [line.rstrip("\r") for line in body.decode().split("\n")], bad, kept


@pytest.mark.parametrize("name", sorted(LINE_CASES))
def test_line_not_holding_one_object_fails_naming_file_and_line(tmp_path, name):
    src, spec, texts, bad, _kept = _line_case(tmp_path, name)
    with pytest.raises(InputDataError) as err:
        run_job(spec)
    first_unreadable = next(n for n in bad if texts[n - 1] != _PREDICT_FAILS)  # a block is read before its rows are predicted
    assert str(err.value).startswith(f"{src}: line {first_unreadable} ")
    assert written(spec.sink_root) == []


@pytest.mark.parametrize("name", sorted(LINE_CASES))
def test_line_not_holding_one_object_is_rejected_alone_and_later_lines_keep_their_numbers(tmp_path, name):
    src, spec, texts, bad, kept = _line_case(tmp_path, name, bad_rows="skip")
    manifest = run_job(spec)
    assert sink_rows(spec.sink_root) == doubled(kept)
    records = rejected(spec.sink_root)
    assert [r["line"] for r in records] == bad
    for record in records:
        if record["stage"] == "read":
            assert record["raw"] == texts[record["line"] - 1]
            assert record["error"].startswith(f"{src}: line {record['line']} ")
        else:  # the predictor's: the row it was given, at the line it came from
            assert (record["stage"], record["row"]["id"], texts[record["line"] - 1]) == ("predict", 99, _PREDICT_FAILS)
    assert (manifest["rows_out"], manifest["rows_rejected"]) == (len(kept), len(bad))


# -- keys and values ----------------------------------------------------------------------
def test_duplicate_keys_fail_naming_the_line_and_key(tmp_path):
    src = write_lines(str(tmp_path / "in" / "a.jsonl"), b'{"id": 0, "value": 0.0}\n{"id": 1, "value": 0.5, "value": 9.0}\n')
    spec = spec_for(src, str(tmp_path / "out"))
    with pytest.raises(InputDataError) as err:
        run_job(spec)
    assert str(err.value) == (
        f"{src}: line 2 gives key 'value' twice; which value is meant is unclear, fix that line "
        "(or set bad_rows='skip' to reject such lines)"
    )


def test_duplicate_keys_are_rejected_under_skip(tmp_path):
    src = write_lines(str(tmp_path / "in" / "a.jsonl"), b'{"id": 0, "value": 0.0}\n{"id": 1, "value": 0.5, "value": 9.0}\n')
    spec = spec_for(src, str(tmp_path / "out"), bad_rows="skip")
    run_job(spec)
    assert sink_rows(spec.sink_root) == doubled([0])
    assert [(r["line"], r["raw"]) for r in rejected(spec.sink_root)] == [(2, '{"id": 1, "value": 0.5, "value": 9.0}')]


@pytest.mark.parametrize("sink_format", ["parquet", "jsonl"])
def test_nested_and_list_values_round_trip(tmp_path, sink_format):
    records = [
        {"id": 0, "meta": {"lang": "en", "tags": ["a", "b"]}, "scores": [0.5, 1.5]},
        {"id": 1, "meta": {"lang": "fr", "tags": []}, "scores": [2.5]},
    ]
    src = write_jsonl(str(tmp_path / "in" / "a.jsonl"), records)
    spec = spec_for(src, str(tmp_path / "out"), predictor="tests.predictors:ArrowPassthrough", batch_format="pyarrow",
                    sink_format=sink_format)
    run_job(spec)
    assert sink_rows(spec.sink_root, sink_format) == records


def test_line_longer_than_a_read_block(tmp_path):
    big = "x" * (9 << 20)  # longer than the 8 MiB JSONL block
    src = write_jsonl(str(tmp_path / "in" / "a.jsonl"), [{"id": 0, "text": "small"}, {"id": 1, "text": big}, {"id": 2, "text": "end"}])
    spec = spec_for(src, str(tmp_path / "out"), predictor="tests.predictors:ArrowPassthrough", batch_format="pyarrow")
    run_job(spec)
    got = sink_rows(spec.sink_root)
    assert [(r["id"], len(r["text"])) for r in got] == [(0, 5), (1, 9 << 20), (2, 3)]
    assert got[1]["text"] == big


def test_empty_file_adds_no_shard_and_no_rows(tmp_path):
    write_lines(str(tmp_path / "in" / "empty.jsonl"), b"")
    write_jsonl(str(tmp_path / "in" / "a.jsonl"), [{"id": i, "value": i * 0.5} for i in range(3)])
    spec = spec_for(str(tmp_path / "in"), str(tmp_path / "out"), source_format="jsonl")
    manifest = run_job(spec)
    assert sink_rows(spec.sink_root) == doubled(range(3))
    assert (manifest["shards"], manifest["rows_in"]) == (1, 3)


# -- invalid UTF-8 ----------------------------------------------------------------------------
LATIN1 = b'{"id": 0, "value": 0.0, "text": "ok"}\n{"id": 1, "value": 0.5, "text": "caf\xe9"}\n{"id": 2, "value": 1.0, "text": "fine"}\n'


BY_FORMAT = {
    "numpy": "tests.predictors:Doubler",
    "pandas": "tests.predictors:PandasUpper",
    "pyarrow": "tests.predictors:ArrowPassthrough",
}


@pytest.mark.parametrize("batch_format", sorted(BY_FORMAT))
def test_invalid_utf8_jsonl_fails_naming_file_and_line(tmp_path, batch_format):
    src = write_lines(str(tmp_path / "in" / "a.jsonl"), LATIN1)
    spec = spec_for(src, str(tmp_path / "out"), batch_format=batch_format, predictor=BY_FORMAT[batch_format])
    with pytest.raises(InputEncodingError) as err:
        run_job(spec)
    assert str(err.value) == (
        f"{src}: line 2 is not valid UTF-8 (invalid continuation byte at byte 36 of the line); re-encode the file "
        "as UTF-8 (e.g. iconv -f latin1 -t utf-8), or set bad_rows='skip' to reject such lines"
    )


def test_invalid_utf8_jsonl_line_is_rejected_verbatim(tmp_path):
    src = write_lines(str(tmp_path / "in" / "a.jsonl"), LATIN1)
    spec = spec_for(src, str(tmp_path / "out"), bad_rows="skip")
    run_job(spec)
    assert sink_rows(spec.sink_root) == doubled([0, 2])
    [record] = rejected(spec.sink_root)
    assert record["line"] == 2 and "raw" not in record
    assert base64.b64decode(record["raw_base64"]) == LATIN1.split(b"\n")[1]


def _parquet_with_latin1(path: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    text = pa.array([b"ok", b"caf\xe9", b"fine"], pa.binary()).view(pa.string())  # not checked on write
    pq.write_table(pa.table({"id": [0, 1, 2], "value": [0.0, 0.5, 1.0], "text": text}), path)
    return path


@pytest.mark.parametrize("batch_format", sorted(BY_FORMAT))
def test_invalid_utf8_in_a_parquet_string_column_fails_naming_row_and_column(tmp_path, batch_format):
    src = _parquet_with_latin1(str(tmp_path / "pin" / "a.parquet"))
    spec = spec_for(src, str(tmp_path / "out"), batch_format=batch_format, predictor=BY_FORMAT[batch_format])
    with pytest.raises(InputEncodingError) as err:
        run_job(spec)
    assert str(err.value) == (
        f"{src}: row 1, column 'text' is not valid UTF-8 (unexpected end of data at byte 3); rewrite "
        "the file with UTF-8 strings (or that column as binary)"
    )


def test_invalid_utf8_in_a_parquet_string_column_is_rejected_under_skip(tmp_path):
    src = _parquet_with_latin1(str(tmp_path / "pin" / "a.parquet"))
    spec = spec_for(src, str(tmp_path / "out"), bad_rows="skip")
    manifest = run_job(spec)
    assert sink_rows(spec.sink_root) == doubled([0, 2])
    [record] = rejected(spec.sink_root)
    assert (record["row_index"], record["stage"], record["row"]["id"]) == (1, "read", 1)
    assert record["row"]["text"] == "caf\\xe9"
    assert (manifest["rows_in"], manifest["rows_out"], manifest["rows_rejected"]) == (3, 2, 1)


# -- the predictor ----------------------------------------------------------------------------
def test_predictor_exception_names_shard_file_and_lines(tmp_path):
    src = write_jsonl(str(tmp_path / "in" / "a.jsonl"), [{"id": i, "value": i * 0.5} for i in range(40)])
    spec = spec_for(src, str(tmp_path / "out"), predictor="tests.predictors:RaiseOnIds", predictor_kwargs={"bad_ids": [20]})
    shard = plan_job(spec).pending[0]
    with pytest.raises(PredictorFailedError) as err:
        run_job(spec)
    assert str(err.value) == (
        f"the predictor raised ValueError: cannot embed row id 20 on shard {shard.shard_id}, {src} lines 17-32"
    )
    assert written(spec.sink_root) == []


def test_predictor_exception_on_one_row_is_isolated_under_skip(tmp_path):
    calls = tmp_path / "calls.log"
    src = write_jsonl(str(tmp_path / "in" / "a.jsonl"), [{"id": i, "value": i * 0.5} for i in range(40)])
    spec = spec_for(src, str(tmp_path / "out"), predictor="tests.predictors:RaiseOnIds",
                    predictor_kwargs={"bad_ids": [20, 21], "calls_log": str(calls)}, bad_rows="skip")
    manifest = run_job(spec)
    assert sink_rows(spec.sink_root) == doubled([i for i in range(40) if i not in (20, 21)])
    records = rejected(spec.sink_root)
    assert [(r["line"], r["row"], r["stage"]) for r in records] == [
        (21, {"id": 20, "value": 10.0}, "predict"), (22, {"id": 21, "value": 10.5}, "predict"),
    ]
    assert records[0]["error"].startswith("the predictor raised ValueError: cannot embed row id 20 on shard")
    assert (manifest["rows_in"], manifest["rows_out"], manifest["rows_rejected"]) == (40, 38, 2)
    # the failing 16-row batch was split in halves down to the two rows, not retried row by row
    assert len(calls.read_text().splitlines()) < 16


def test_ragged_predictor_output_becomes_a_list_column(tmp_path):
    src = write_jsonl(str(tmp_path / "in" / "a.jsonl"), [{"id": i, "value": i * 0.5} for i in range(5)])
    spec = spec_for(src, str(tmp_path / "out"), predictor="tests.predictors:RaggedTokens")
    run_job(spec)
    assert sink_rows(spec.sink_root) == [{"id": i, "tokens": list(range(i % 3 + 1))} for i in range(5)]


def test_mistyped_predictor_output_names_the_column(tmp_path):
    src = write_jsonl(str(tmp_path / "in" / "a.jsonl"), [{"id": i, "value": i * 0.5} for i in range(5)])
    spec = spec_for(src, str(tmp_path / "out"), predictor="tests.predictors:MistypedOutput", bad_rows="skip")
    with pytest.raises(PredictorOutputError) as err:
        run_job(spec)
    assert str(err.value).startswith("the predictor's output column 'label' cannot be converted to Arrow (")
    assert written(spec.sink_root) == []


def test_verify_checks_rejected_files_against_their_sentinel(tmp_path):
    from airflow_batch_provider.core.domain.inspection import verify_sink

    src = write_lines(str(tmp_path / "in" / "a.jsonl"), MALFORMED)
    spec = spec_for(src, str(tmp_path / "out"), bad_rows="skip")
    manifest = run_job(spec)
    assert verify_sink(spec.sink_root).problems == []
    path = os.path.join(spec.sink_root, "_rejected", manifest["parts"][0]["rejected"])
    with open(path, "ab") as handle:
        handle.write(b'{"forged": true}\n')
    [problem] = verify_sink(spec.sink_root).problems
    assert problem.startswith(f"{path}: {os.path.getsize(path)} bytes, its sentinel says ")


# -- max_bad_rows ---------------------------------------------------------------------------
def _mostly_bad(path: str) -> str:
    lines = [b'{"id": %d, "value": 1.0}' % i if i % 4 else b"garbage %d" % i for i in range(20)]
    return write_lines(path, b"\n".join(lines) + b"\n")


def test_max_bad_rows_count_exceeded_fails_naming_the_first_bad_lines(tmp_path):
    src = _mostly_bad(str(tmp_path / "in" / "a.jsonl"))
    spec = spec_for(src, str(tmp_path / "out"), bad_rows="skip", max_bad_rows=2)
    shard = plan_job(spec).pending[0]
    with pytest.raises(BadRowLimitError) as err:
        run_job(spec)
    message = str(err.value)
    assert message.startswith(f"{src}: shard {shard.description} has more bad rows than max_bad_rows=2 allows (stopped at 3); the first: line 1 (")
    assert "; line 5 (" in message and "; line 9 (" in message
    assert message.endswith("Fix the input, or raise max_bad_rows.")
    assert written(spec.sink_root) == []


def test_max_bad_rows_fraction_exceeded_and_within(tmp_path):
    src = _mostly_bad(str(tmp_path / "in" / "a.jsonl"))  # 5 bad lines of 20
    spec = spec_for(src, str(tmp_path / "out"), bad_rows="skip", max_bad_rows=0.2)
    with pytest.raises(BadRowLimitError, match=r"max_bad_rows=0.2 of the shard's 20 rows = 4 allows \(stopped at 5\)"):
        run_job(spec)
    assert written(spec.sink_root) == []
    spec = spec_for(src, str(tmp_path / "out"), bad_rows="skip", max_bad_rows=0.25)
    manifest = run_job(spec)
    assert manifest["rows_rejected"] == 5
    assert [r["line"] for r in rejected(spec.sink_root)] == [1, 5, 9, 13, 17]
    assert [r["id"] for r in sink_rows(spec.sink_root)] == [i for i in range(20) if i % 4]


# -- crash at the commit point ----------------------------------------------------------------
_CHILD = """
import sys
from airflow_batch_provider.core.domain.commit import new_attempt
from airflow_batch_provider.core.domain.jobs import plan_job
from airflow_batch_provider.core.execution.runner import ShardRunner
from airflow_batch_provider.core.spec import JobSpec
spec = JobSpec(source=sys.argv[1], sink=sys.argv[2], predictor="tests.predictors:Doubler", bad_rows="skip",
                 rows_per_shard=10, batch_size=4)
runner = ShardRunner(spec)
for shard in plan_job(spec).pending:
    runner.run(shard, new_attempt())
"""


@pytest.mark.parametrize("point", ["before_sentinel", "before_publish", "before_publish_rejected", "after_publish"])
def test_rerun_after_kill_at_the_commit_never_duplicates_rejected_rows(tmp_path, point):
    src = _mostly_bad(str(tmp_path / "in" / "a.jsonl"))
    sink = str(tmp_path / "out")
    env = {**os.environ, "PYTHONPATH": ROOT, "ABP_FAILPOINTS": f"{point}=kill@{tmp_path / 'fired'}"}
    child = subprocess.run([sys.executable, "-c", _CHILD, src, sink], env=env, cwd=ROOT, capture_output=True, text=True)
    assert child.returncode == -9, child.stderr[-2000:]
    spec = spec_for(src, sink, bad_rows="skip", rows_per_shard=10, batch_size=4)
    manifest = run_job(spec)
    assert [r["line"] for r in rejected(sink)] == [1, 5, 9, 13, 17]
    assert [r["id"] for r in sink_rows(sink)] == [i for i in range(20) if i % 4]
    assert (manifest["rows_in"], manifest["rows_out"], manifest["rows_rejected"]) == (20, 15, 5)
    assert len(glob.glob(os.path.join(sink, "_rejected", "*.jsonl"))) == 2
    # the killed attempt's staged files stay hidden until idle past finalize's grace period
    # (they could be another run's live attempt's); with no grace, finalize removes them
    finalize_job(spec, orphan_grace_s=0)
    assert glob.glob(os.path.join(sink, "_rejected", "_staging", "*")) == []


# -- input pinned while it is read --------------------------------------------------------------
def test_file_deleted_after_plan_is_named(tmp_path):
    src = write_jsonl(str(tmp_path / "in" / "a.jsonl"), [{"id": i, "value": i * 0.5} for i in range(5)])
    spec = spec_for(src, str(tmp_path / "out"))
    pending = plan_job(spec).pending
    os.remove(src)
    with pytest.raises(InputChangedError) as err:
        ShardRunner(spec).run(pending[0], new_attempt())
    assert str(err.value) == (
        f"input {src} is gone since the plan recorded it; the shard reads only the planned version, so it failed "
        "before committing anything. Clear the plan task (or trigger a new run) to plan the file as it is now, "
        "or restore the file."
    )
    assert written(spec.sink_root) == []


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_file_rewritten_after_plan_fails_before_commit(tmp_path, fmt):
    records = [{"id": i, "value": i * 0.5} for i in range(5)]
    if fmt == "jsonl":
        src = write_jsonl(str(tmp_path / "in" / "a.jsonl"), records)
    else:
        src = write_parquet(str(tmp_path / "in" / "a.parquet"), records)
    spec = spec_for(src, str(tmp_path / "out"))
    pending = plan_job(spec).pending
    planned = pending[0].version
    if fmt == "jsonl":
        write_jsonl(src, [{**r, "value": r["value"] + 1} for r in records])  # same layout, new content
    else:
        write_parquet(src, [{**r, "value": r["value"] + 1} for r in records])
    stat = os.stat(src)
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    with pytest.raises(InputChangedError) as err:
        ShardRunner(spec).run(pending[0], new_attempt())
    now = JobStorage.for_spec(spec).source.version_of({"size": os.stat(src).st_size, "mtime": os.stat(src).st_mtime})
    assert str(err.value).startswith(f"input {src} changed (version {planned} when planned, {now} now) since the plan recorded it")
    assert written(spec.sink_root) == []


def test_file_rewritten_while_its_shard_is_read_fails_before_commit(tmp_path):
    src = write_jsonl(str(tmp_path / "in" / "a.jsonl"), [{"id": i, "value": i * 0.5, "text": f"text {i}"} for i in range(100)])
    spec = spec_for(src, str(tmp_path / "out"), predictor="tests.predictors:RewritesSource",
                    predictor_kwargs={"path": src}, batch_size=10)
    with pytest.raises(InputChangedError, match=f"input {src} changed \\(version .* when planned, .* now\\)"):
        run_job(spec)
    assert written(spec.sink_root) == []


def test_s3_object_rewritten_after_plan_fails_before_commit(s3_server, s3_bucket, tmp_path):
    client = s3_server.client()
    options = s3_server.storage_options()
    body = "".join(json.dumps({"id": i, "value": i * 0.5}) + "\n" for i in range(5)).encode()
    client.put_object(Bucket=s3_bucket, Key="in/a.jsonl", Body=body)
    spec = spec_for(f"s3://{s3_bucket}/in/a.jsonl", f"s3://{s3_bucket}/out")
    storage = JobStorage.for_spec(spec, options)
    pending = plan_job(spec, storage).pending
    client.put_object(Bucket=s3_bucket, Key="in/a.jsonl", Body=body.replace(b'"value": 0.5', b'"value": 7.5'))
    with pytest.raises(InputChangedError) as err:
        ShardRunner(spec, options).run(pending[0], new_attempt())
    assert str(err.value).startswith(f"input s3://{s3_bucket}/in/a.jsonl changed (ETag ")
    assert "since the plan recorded it; the shard reads only the planned version" in str(err.value)
    listed = client.list_objects_v2(Bucket=s3_bucket, Prefix="out/").get("Contents", [])
    assert [o["Key"] for o in listed if "/part-" in o["Key"] or "/shards/" in o["Key"]] == []

    client.delete_object(Bucket=s3_bucket, Key="in/a.jsonl")
    with pytest.raises(InputChangedError, match=f"input s3://{s3_bucket}/in/a.jsonl is gone since the plan recorded it"):
        ShardRunner(spec, options).run(pending[0], new_attempt())


def test_s3_object_rewritten_while_it_is_read_answers_412_not_new_bytes(s3_server, s3_bucket):
    """Each ranged GET is conditional: the read after the overwrite fails, it never mixes versions."""
    from airflow_batch_provider.core.stores.s3 import S3Store
    from airflow_batch_provider.core.tunables import S3_READ_BLOCK as READ_BLOCK

    client = s3_server.client()
    body = b"".join(b'{"id": %d, "text": "%s"}\n' % (i, b"x" * 1000) for i in range((2 * READ_BLOCK) // 1000))
    client.put_object(Bucket=s3_bucket, Key="in/big.jsonl", Body=body)
    store = S3Store(s3_server.storage_options())
    url = f"s3://{s3_bucket}/in/big.jsonl"
    [planned] = store.find_inputs(url, (".jsonl",))
    with pytest.raises(InputChangedError) as err:
        with store.read_pinned(url, planned.version) as handle:
            assert handle.read(1000) == body[:1000]
            client.put_object(Bucket=s3_bucket, Key="in/big.jsonl", Body=body.replace(b"x", b"y"))
            handle.seek(READ_BLOCK + 10)
            handle.read(1000)
    assert str(err.value).startswith(f"input {url} changed while it was read (ETag ")


def test_s3_bad_rows_are_committed_with_the_shard(s3_server, s3_bucket):
    client = s3_server.client()
    options = s3_server.storage_options()
    client.put_object(Bucket=s3_bucket, Key="in/a.jsonl", Body=MALFORMED)
    spec = spec_for(f"s3://{s3_bucket}/in/a.jsonl", f"s3://{s3_bucket}/out", bad_rows="skip")
    manifest = run_job(spec, options)
    assert manifest["rows_rejected"] == 1
    [part] = manifest["parts"]
    raw = client.get_object(Bucket=s3_bucket, Key=f"out/_rejected/{part['shard_id']}.jsonl")["Body"].read()
    [record] = [json.loads(line) for line in raw.splitlines()]
    assert (record["file"], record["line"], record["raw"]) == (f"s3://{s3_bucket}/in/a.jsonl", 3, '{"id": 2, "value": ')
    body = client.get_object(Bucket=s3_bucket, Key=f"out/{part['part']}")["Body"].read()
    assert sorted(pq.read_table(pa.BufferReader(body)).column("id").to_pylist()) == [0, 1, 3]


def test_spec_refuses_unknown_policy_and_bad_limits():
    from airflow_batch_provider.core.errors import BatchSpecError

    with pytest.raises(BatchSpecError, match="bad_rows='drop' is not supported; allowed: fail, skip"):
        spec_for("a.jsonl", "out", bad_rows="drop")
    with pytest.raises(BatchSpecError, match="max_bad_rows must be a count"):
        spec_for("a.jsonl", "out", bad_rows="skip", max_bad_rows=1.5)
    with pytest.raises(BatchSpecError, match="max_bad_rows is a limit of bad_rows='skip'"):
        spec_for("a.jsonl", "out", max_bad_rows=3)


# -- through Airflow ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dag_tester(tmp_path_factory):
    from tests.integration.dagtest import DagTester

    return DagTester(str(tmp_path_factory.mktemp("airflow_home")))


@pytest.mark.slow
def test_dag_run_reports_rejected_rows_in_log_manifest_and_asset_event(dag_tester, tmp_path):
    import sqlite3

    from airflow_batch_provider import BatchSpec

    src = _mostly_bad(str(tmp_path / "in" / "a.jsonl"))
    spec = BatchSpec(source=src, sink=str(tmp_path / "out"), predictor="tests.predictors:Doubler",
                            rows_per_shard=10, num_cpus=1, bad_rows="skip", max_bad_rows=0.5)
    run = dag_tester.run(spec)
    assert run.state == "success", run.output[-4000:]
    assert "15 rows out, 5 rows rejected" in run.output
    assert "rows rejected, " in run.output and "3 rows rejected" in run.output and "2 rows rejected" in run.output
    assert json.load(open(os.path.join(spec.sink_root, "_SUCCESS")))["rows_rejected"] == 5
    assert [r["line"] for r in rejected(spec.sink_root)] == [1, 5, 9, 13, 17]
    assert [r["id"] for r in sink_rows(spec.sink_root)] == [i for i in range(20) if i % 4]
    db = sqlite3.connect(os.path.join(dag_tester.home, "airflow.db"))
    try:
        [(extra,)] = db.execute("select extra from asset_event order by id desc limit 1").fetchall()
    finally:
        db.close()
    assert json.loads(extra)["rows_rejected"] == 5


# -- values the job's schema cannot hold (the schema's lossless conform step, under the policy) --
MISFIT = (
    b'{"id": 0, "value": 0.0}\n'
    b'{"id": 1, "value": "n/a"}\n'
    b'{"id": 2, "value": 1.0}\n'
    b'{"id": 123456789012345678901234567890, "value": 1.5}\n'
    b'{"id": 4, "value": 2.0, "ignored": "a column input_schema does not name"}\n'
)


def test_value_the_declared_schema_cannot_hold_fails_naming_line_and_column(tmp_path):
    src = write_lines(str(tmp_path / "in" / "a.jsonl"), MISFIT)
    spec = spec_for(src, str(tmp_path / "out"), input_schema={"id": "int64", "value": "double"})
    with pytest.raises(InputDataError) as err:
        run_job(spec)
    assert str(err.value).startswith(f"{src}: line 2 (shard ")
    assert "column 'value' holds string value 'n/a', which float64 in the job's schema cannot hold unchanged" in str(err.value)
    assert written(spec.sink_root) == []


def test_values_the_schema_cannot_hold_are_rejected_under_skip(tmp_path):
    src = write_lines(str(tmp_path / "in" / "a.jsonl"), MISFIT)
    spec = spec_for(src, str(tmp_path / "out"), input_schema={"id": "int64", "value": "double"}, bad_rows="skip")
    manifest = run_job(spec)
    assert sink_rows(spec.sink_root) == doubled([0, 2, 4])
    records = rejected(spec.sink_root)
    assert [(r["line"], r["stage"], r["raw"]) for r in records] == [
        (2, "read", '{"id": 1, "value": "n/a"}'),
        (4, "read", '{"id": 123456789012345678901234567890, "value": 1.5}'),
    ]
    assert "column 'value' holds string value 'n/a', which float64 in the job's schema cannot hold unchanged" in records[0]["error"]
    assert "needs more than 64 bits" in records[1]["error"]
    assert (manifest["rows_in"], manifest["rows_out"], manifest["rows_rejected"]) == (5, 3, 2)


def test_shard_whose_every_row_is_rejected_commits_no_part_but_its_rejected_rows(tmp_path):
    write_lines(str(tmp_path / "in" / "a.jsonl"), b"garbage\n{oops\n[1, 2]\n")
    write_jsonl(str(tmp_path / "in" / "b.jsonl"), [{"id": i, "value": i * 0.5} for i in range(3)])
    spec = spec_for(str(tmp_path / "in"), str(tmp_path / "out"), source_format="jsonl", bad_rows="skip")
    manifest = run_job(spec)
    assert sink_rows(spec.sink_root) == doubled(range(3))
    assert len(glob.glob(os.path.join(spec.sink_root, "part-*"))) == 1
    assert [(os.path.basename(r["file"]), r["line"], r["raw"]) for r in rejected(spec.sink_root)] == [
        ("a.jsonl", 1, "garbage"), ("a.jsonl", 2, "{oops"), ("a.jsonl", 3, "[1, 2]"),
    ]
    assert (manifest["shards"], manifest["rows_in"], manifest["rows_out"], manifest["rows_rejected"]) == (2, 6, 3, 3)
    again = plan_job(spec)
    assert (again.committed, again.pending) == (2, [])


def test_kill_before_publishing_the_rejected_rows_of_a_shard_without_part(tmp_path):
    lines = [b"garbage %d" % i for i in range(10)] + [b'{"id": %d, "value": 1.0}' % i for i in range(10, 20)]
    src = write_lines(str(tmp_path / "in" / "a.jsonl"), b"\n".join(lines) + b"\n")
    sink = str(tmp_path / "out")
    env = {**os.environ, "PYTHONPATH": ROOT, "ABP_FAILPOINTS": f"before_publish_rejected=kill@{tmp_path / 'fired'}"}
    child = subprocess.run([sys.executable, "-c", _CHILD, src, sink], env=env, cwd=ROOT, capture_output=True, text=True)
    assert child.returncode == -9, child.stderr[-2000:]
    assert glob.glob(os.path.join(sink, "_rejected", "*.jsonl")) == []  # committed, not yet published
    manifest = run_job(spec_for(src, sink, bad_rows="skip", rows_per_shard=10, batch_size=4))
    assert [r["line"] for r in rejected(sink)] == list(range(1, 11))
    assert [r["id"] for r in sink_rows(sink)] == list(range(10, 20))
    assert (manifest["rows_in"], manifest["rows_out"], manifest["rows_rejected"]) == (20, 10, 10)


def test_gc_lists_rejected_rows_a_killed_attempt_staged(tmp_path):
    from airflow_batch_provider.core.domain.inspection import collect_garbage

    src = _mostly_bad(str(tmp_path / "in" / "a.jsonl"))
    sink = str(tmp_path / "out")
    env = {**os.environ, "PYTHONPATH": ROOT, "ABP_FAILPOINTS": f"before_sentinel=kill@{tmp_path / 'fired'}"}
    child = subprocess.run([sys.executable, "-c", _CHILD, src, sink], env=env, cwd=ROOT, capture_output=True, text=True)
    assert child.returncode == -9, child.stderr[-2000:]
    found = collect_garbage(sink, older_than_s=0, apply=True)
    assert sorted(line.split(" (started")[0] for line in found) == sorted([
        f"removed staged part for {sink}/part-{_first_shard(src, sink)}.parquet",
        f"removed staged part for {sink}/_rejected/{_first_shard(src, sink)}.jsonl",
    ])
    assert glob.glob(os.path.join(sink, "_rejected", "_staging", "*")) == []


def _first_shard(src: str, sink: str) -> str:
    return plan_job(spec_for(src, sink, bad_rows="skip", rows_per_shard=10, batch_size=4)).pending[0].shard_id
