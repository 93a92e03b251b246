"""``airflow-batch``: look after a sink from a shell (``python -m airflow_batch_provider`` too).

    airflow-batch status SINK [--json] [--gpu-hour-price P]   shards, rows, bytes, counters, cost, speed, last commits
    airflow-batch verify SINK                                 re-read every part; non-zero exit on a mismatch
    airflow-batch gc SINK --older-than 6h [--yes]             leftovers of crashed attempts, old quarantine

S3 credentials are resolved as the tasks resolve them (``hooks.storage.storage_options_at``):
from the Airflow connection named by ``--conn-id`` (one that does not exist is an error), else
from ``aws_default``, and where that does not exist either, from the usual AWS environment
(``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, profiles). Exit status: see ``EXIT_CODES``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
from datetime import datetime, timezone
from typing import Any

from airflow_batch_provider.core import api
from airflow_batch_provider.hooks.storage import storage_options_at

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

#: so that a pipeline can gate on ``status`` and ``verify``
EXIT_CODES = """exit status:
  0  a healthy sink (status: it may still be running; verify: every committed part re-read and matching)
  1  the sink has problems, one line each: a part that differs from its sentinel or is gone, a part or
     rejected-rows file no sentinel names, a sentinel that does not parse, a plan or _SUCCESS that
     disagrees with the sentinels (status looks at listings and sizes; verify re-reads every byte)
  2  no sink could be read: no such path, nothing of a batch job there (no plan, sentinel or _SUCCESS:
     pass --checkpoint-dir when the job sets checkpoint_dir), an unsupported URL (gs://, s3:// without
     bucket), an Airflow connection that does not exist, a storage error, or bad arguments"""


def parse_duration(text: str) -> float:
    """``90s``, ``30m``, ``6h``, ``7d`` -> seconds (more than none)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration; write it like 90s, 30m, 6h or 7d")
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: gc needs a grace period longer than your longest shard task, e.g. 6h "
                                         "(with none, it removes the parts that running tasks are writing)")
    return seconds


def _price(text: str) -> float:
    try:
        price = float(text)
    except ValueError:
        price = -1.0
    if not 0 <= price < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a price; give what one GPU-hour costs, e.g. 2.5")
    return price


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("airflow-batch-provider")
    except PackageNotFoundError:
        return "unknown (not installed)"


def storage_options(sink: str, checkpoint_dir: str | None, conn_id: str | None) -> dict[str, Any] | None:
    """The options the tasks would use for this sink (``hooks.storage.storage_options_at``).

    The URLs are checked first, so that one no store serves is a one-line error before any
    connection is looked for. Reading a connection imports Airflow, which logs to stdout:
    stdout is this command's output (``status --json``), so Airflow's and the amazon
    provider's logs ("credentials retrieved from login and password", ...) go to stderr."""
    api.check_location(sink, "sink")
    if checkpoint_dir:
        api.check_location(checkpoint_dir, "checkpoint_dir")
    _logs_to_stderr()
    with contextlib.redirect_stdout(sys.stderr):  # structlog's own loggers write to sys.stdout
        try:
            return storage_options_at((sink, checkpoint_dir), conn_id)
        except Exception as err:
            from airflow.sdk.exceptions import AirflowNotFoundException, AirflowOptionalProviderFeatureException

            # A connection that does not exist (named, so never the default chain instead), or
            # the amazon provider missing: one line, exit status 2.
            if isinstance(err, (AirflowNotFoundException, AirflowOptionalProviderFeatureException)):
                raise api.BatchSpecError(str(err)) from None
            raise
        finally:
            _logs_to_stderr()  # the handlers Airflow's import configured


def _logs_to_stderr() -> None:
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout, sys.__stdout__):
            handler.setStream(sys.stderr)


def _when(stamp: float | None) -> str:
    if stamp is None:
        return "-"
    return datetime.fromtimestamp(stamp, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _mib(size: int) -> str:
    return f"{size / (1 << 20):,.1f} MiB"


def _figure(value: float) -> str:
    return f"{value:,.1f}" if isinstance(value, float) else f"{value:,}"


def _speed(status: api.SinkStatus) -> str:
    """rows/s, and tokens/s beside it (each ``tokens*`` counter) over the same span."""
    rate = status.rows_per_second
    if not rate:
        return "-"
    span = (status.last_commit_at or 0) - (status.planned_at or 0)
    rates = [f"{rate:,.0f} rows/s"] + [f"{value:,.0f} {name}/s" for name, value in status.counters_per_second.items()
                                       if name.startswith("tokens")]
    return f"{', '.join(rates)} over {span / 60:.1f} min from the plan to the last commit"


def _compute(counters: dict[str, Any]) -> str:
    gpu = counters.get("gpu_seconds", 0)
    return (f"{counters.get('replica_seconds', 0):,.1f} replica-s, {counters.get('model_seconds', 0):,.1f} s in the model, "
            f"{gpu:,.1f} GPU-s ({gpu / 3600:,.3f} GPU-h)")


def render_status(status: api.SinkStatus) -> str:
    own = {k: v for k, v in status.counters.items() if k not in ("replica_seconds", "model_seconds", "gpu_seconds")}
    lines = [
        f"sink        {status.sink}",
        f"checkpoint  {status.checkpoint_dir}",
        f"shards      {status.planned_shards:,} planned: {status.committed:,} committed, {status.pending:,} pending, "
        f"{status.quarantined:,} quarantined",
        f"rows        {status.rows_in:,} in, {status.rows_out:,} out, {status.rows_rejected:,} rejected "
        f"(planned {status.planned_rows:,})",
        *_redrive_lines(status),
        f"bytes       {_mib(status.bytes)}",
        f"counters    {', '.join(f'{name} {_figure(value)}' for name, value in own.items()) or '-'}",
        f"compute     {_compute(status.counters)}",
    ]
    if status.cost is not None:
        lines.append(f"cost        {status.cost:,.2f} at {status.gpu_hour_price:g} per GPU-hour")
    lines += [
        f"speed       {_speed(status)}",
        f"finalized   {_when(status.finalized_at) if status.finalized_at else 'no'}",
    ]
    if status.throughput:
        lines.append("rows per minute:")
        lines += [f"  {_when(minute)}  {rows:>12,}" for minute, rows in status.throughput[-10:]]
    if status.last_commits:
        lines.append("last commits:")
        lines += [f"  {_when(c.committed_at)}  {c.shard_id}  {c.rows_in:>10,} rows  {_mib(c.bytes):>12}  {c.part}"
                  for c in status.last_commits]
    lines += [f"PROBLEM {problem}" for problem in status.problems]
    lines.append(f"(read in {status.seconds:.2f} s; {len(status.problems)} problem(s))")
    return "\n".join(lines)


def _redrive_lines(status: api.SinkStatus) -> list[str]:
    """Rejected rows waiting in ``_rejected/``, and how to compute them again (docs/redrive.md)."""
    lines = []
    if status.rows_rejected:
        lines.append(
            f"rejected    {status.rows_rejected:,} rows in {status.rejected_files:,} file(s) under {status.sink}/_rejected/; "
            "once the predictor is fixed, compute them again with a run of redrive_rejected=True (a spec option, or "
            "trigger the DAG with conf {\"redrive_rejected\": true} where the spec templates it; docs/redrive.md)"
        )
    if status.redrives:
        lines.append(f"re-driven   {status.rows_redriven:,} rows in {status.redrives:,} re-drive(s); "
                     f"the files they retired are in {status.sink}/_rejected/_retired/")
    return lines


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # here, where a reader gone is caught, not at the interpreter's exit
        return code
    except BrokenPipeError:  # ``airflow-batch status | head``: the reader has gone, say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # as a shell reports a process ended by SIGPIPE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="airflow-batch", description="Look after the sink of a batch inference job.",
                                     epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("status", "shards committed, pending and quarantined; rows, bytes, the predictor's counters "
                                  "(tokens...), replica and GPU seconds and their cost, speed (rows and tokens per "
                                  "second from the plan's writing to the last commit), last commits; problems the "
                                  "listings show"),
                       ("verify", "re-read every committed part; check its size and sha256 against its sentinel, and "
                                  "the sink's files against its sentinels, plan and _SUCCESS"),
                       ("gc", "remove what crashed attempts left (staged parts, orphan uploads) and old quarantine entries")):
        command = commands.add_parser(name, help=text, description=text, epilog=EXIT_CODES if name != "gc" else None,
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
        command.add_argument("sink", help="the sink: a local path or s3://bucket/prefix")
        command.add_argument("--checkpoint-dir", help="the job's checkpoint_dir, when it is not {sink}/_checkpoint")
        command.add_argument("--conn-id", help="Airflow connection for S3 credentials; it must exist "
                                               "(default: aws_default where it exists, else the AWS environment)")
        if name == "status":
            command.add_argument("--json", action="store_true", help="print the figures as JSON")
            command.add_argument("--gpu-hour-price", type=_price, metavar="PRICE",
                                 help="what one GPU-hour costs: show the cost of the GPU-seconds at it (default: the "
                                      "price the job's spec set, as _SUCCESS or the newest commit records it)")
        if name == "gc":
            command.add_argument("--older-than", type=parse_duration, required=True,
                                 help="only what is older than this (longer than your longest shard task), e.g. 6h")
            command.add_argument("--yes", action="store_true", help="remove; without it, only print what would go")
    return parser


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    try:
        options = storage_options(args.sink, args.checkpoint_dir, args.conn_id)
        if args.command == "status":
            status = api.sink_status(args.sink, args.checkpoint_dir, options, gpu_hour_price=args.gpu_hour_price)
            print(json.dumps(status.to_dict(), indent=1) if args.json else render_status(status))
            return 1 if status.problems else 0
        if args.command == "verify":
            result = api.verify_sink(args.sink, args.checkpoint_dir, options)
            for problem in result.problems:
                print(f"MISMATCH {problem}")
            print(f"{result.checked} committed parts checked, {len(result.problems)} problem(s)")
            return 1 if result.problems else 0
        lines = api.collect_garbage(args.sink, args.checkpoint_dir, options, older_than_s=args.older_than, apply=args.yes)
        print("\n".join(lines) if lines else "nothing to remove")
        if lines and not args.yes:
            print("(dry run: add --yes to remove them)")
        return 0
    except BrokenPipeError:
        raise
    except (api.BatchError, OSError, ValueError) as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
