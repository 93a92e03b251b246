"""The job description (what a DAG author's ``BatchSpec`` holds), and the fingerprint that guards resume.

`JobSpec` knows nothing of Airflow or Ray: it is validated when it is built (for a DAG
author's ``airflow_batch_provider.BatchSpec``, a subclass, at DAG parse time), travels as a plain dict through XCom and template rendering, and is rebuilt
on the other side with `JobSpec.from_dict`.

The *spec fingerprint* hashes exactly what changes the output rows (predictor, its kwargs,
formats, the input columns read). Batch size, shard size and resources are left out: they
change speed, not results. Committed shards are only reused under the same fingerprint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import InitVar, dataclass, field
from typing import Any

from airflow_batch_provider.core.errors import BatchSpecError
from airflow_batch_provider.core.renames import both_given, take_renamed, warn_renamed
from airflow_batch_provider.core.stores.urls import is_remote, local_path_of, protocol_of

#: File formats and the extensions that name them; the first one is what a sink part is
#: written with. Format inference, directory scans and part names all read this table.
FORMAT_EXTENSIONS = {"jsonl": (".jsonl", ".ndjson", ".json"), "parquet": (".parquet", ".pq")}
SOURCE_FORMATS = ("jsonl", "parquet")
SINK_FORMATS = ("parquet", "jsonl")
BATCH_FORMATS = ("numpy", "pandas", "pyarrow")
BAD_ROW_POLICIES = ("fail", "skip")

#: How much of a node's ``accelerator_type:<name>`` resource a replica asks for: Ray's own
#: ``accelerator_type`` option asks for this sliver, so that any number of replicas fit.
ACCELERATOR_SLIVER = 0.001

#: Fields whose values change the rows a job writes; everything else only changes speed.
FINGERPRINT_FIELDS = ("predictor", "predictor_kwargs", "source_format", "sink_format", "batch_format", "columns")

#: Fields renamed, old name -> new name: the old one is still accepted, with a DeprecationWarning.
RENAMED_FIELDS = {"num_workers": "num_replicas"}

#: Default shard size: a minute or two of a small model on CPU, so the time a deployment
#: spends between two shard tasks stays a small share; GPU jobs should raise it (see
#: docs/tuning.md, "Choosing rows_per_shard"; the figures are in docs/benchmarks.md).
DEFAULT_ROWS_PER_SHARD = 10_000


def infer_format(path: str) -> str | None:
    """Format implied by a path's extension (globs included), or None when it says nothing."""
    lowered = path.lower().rstrip("/")
    for fmt, extensions in FORMAT_EXTENSIONS.items():
        if lowered.endswith(extensions):
            return fmt
    return None


def default_checkpoint_root(sink: str) -> str:
    """Where plan and sentinels live unless ``checkpoint_dir`` says otherwise."""
    return f"{sink.rstrip('/')}/_checkpoint"


def file_extension(file_format: str) -> str:
    """The extension a file of ``file_format`` is written with (``.parquet``, ``.jsonl``)."""
    return FORMAT_EXTENSIONS[file_format][0]


@dataclass(frozen=True)
class JobSpec:
    """What to run, over which input, into which sink: the core's job description.

    A DAG author writes :class:`airflow_batch_provider.BatchSpec`, which is this plus the
    Airflow connection for S3 (``.core()`` gives this back); any other host of the core (a
    script, a benchmark) builds this one directly.

    :param source: a file, a directory or a glob; a local path or a URL (``s3://bucket/prefix``).
    :param sink: directory (local or URL) that receives ``part-{shard_id}.{ext}`` files.
    :param predictor: ``"package.module:ClassName"``: a callable class whose ``__init__``
        takes ``predictor_kwargs`` and loads the model once, and whose ``__call__(batch)``
        returns the output batch (Ray Data's ``map_batches`` contract).
    :param predictor_kwargs: JSON-serialisable keyword arguments for the predictor.
    :param source_format: ``jsonl`` or ``parquet``; inferred from the extension when omitted.
    :param sink_format: ``parquet`` (default) or ``jsonl``.
    :param batch_size: rows per predictor call.
    :param batch_format: ``numpy`` (dict of arrays), ``pandas`` or ``pyarrow``, as in Ray Data.
    :param columns: input columns to read (None: all). Part of the fingerprint.
    :param rows_per_shard: target rows per shard (one part file each).
    :param num_gpus: GPUs each model replica requests.
    :param num_cpus: CPUs each model replica requests.
    :param num_replicas: model replicas (Ray actors) at most; default: as many as the Ray
        cluster fits (on an autoscaling cluster: as many as its node types can become).
        Each loads the model once and serves shard after shard. (Formerly ``num_workers``,
        still accepted with a DeprecationWarning.)
    :param min_replicas: replicas the job asks for when it starts (the plan task), before
        any shard waits: on an autoscaling cluster, the nodes the autoscaler brings up at
        once. The pool grows beyond it, up to ``num_replicas``, as shard tasks wait for a
        replica. Default: one per pending work unit, up to ``num_replicas``.
    :param memory: bytes of memory each replica reserves (Ray's ``memory`` resource), so
        that Ray places no more replicas on a node than its memory holds.
    :param accelerator_type: the accelerator a replica must run on (``"H100"``, ``"L4"``,
        ``"A10G"``: Ray's ``accelerator_type`` option, matched against the node's
        ``accelerator_type:<name>`` resource).
    :param resources: custom Ray resources each replica asks for, ``{name: amount}``.
    :param runtime_env: Ray's ``runtime_env`` for the replicas (``working_dir``,
        ``py_modules``, ``pip``, ``env_vars``, ...): how the predictor's code and its
        dependencies reach a cluster that does not have them installed. Given to the replicas
        only when set (without it they run in Ray's pre-started worker processes). A local
        ``working_dir`` or ``py_modules`` directory is uploaded to the cluster by the pool and
        the replicas are keyed by its content hash (``core/ray/shipping.py``). A host may give a
        default (:meth:`with_runtime_env`: the Airflow operators take the ``ray_batch`` connection's
        extra); the spec's own wins. Not part
        of the fingerprint, like the predictor's code itself: shipping code differently does
        not change what a predictor computes (change ``predictor_kwargs``, or start over with
        ``resume=False``, when new code computes other rows). Never put secrets here: Ray keeps
        a runtime_env in its metadata; use ``predictor_secrets``.
    :param checkpoint_dir: where the plan and the sentinels live; default ``{sink}/_checkpoint``.
    :param resume: reuse committed shards (default). False starts over once per run of the
        host (the plan's ``reset_key``): it deletes ``_SUCCESS``, then the parts and sentinels
        this job's sentinels name (never a file it did not write), then the plan.
    :param max_retries: how many times, within one task try, a shard call lost with its
        replica or its node is run again on another replica. A call that fails by itself (the
        predictor raised, say) is not run again here: that is the shard task's ``retries``.
        A replica that dies is restarted by Ray as often (its actor's ``max_restarts``, over
        its life): a lost call takes its replica with it, and the restart gives the pool that
        replica back, so a job that runs its calls again keeps its replicas too. Ray itself
        never runs the call again (``max_task_retries=0``): it would wait for that one
        replica's restart, where another replica can run the call at once.
    :param input_schema: the input's columns and Arrow types, ``{column: type}`` (e.g.
        ``{"id": "int64", "text": "string"}``); default: settled at plan time from every
        Parquet footer or a sample of every JSONL shard. Part of the fingerprint when set.
    :param output_schema: the part files' columns and types; default: what the first shard
        to produce rows returned, recorded in the checkpoint. Part of the fingerprint when set.
    :param predictor_secrets: predictor keyword arguments whose values are secrets, as
        ``{kwarg: reference}``; the host resolves each reference (the Airflow layer:
        ``conn:<conn_id>`` or ``var:<key>``) in the task process and hands the values to the
        model replicas through Ray's object store. Only the references are kept in the spec,
        the plan, the sentinels and the fingerprint.
    :param bad_rows: what a row that cannot be read, or that makes the predictor raise, does:
        ``"fail"`` (default) fails its shard with an error naming the file and line; ``"skip"``
        writes it, verbatim with its file, line (or row index) and error, to
        ``{sink}/_rejected/{shard_id}.jsonl``, committed with the shard. Not fingerprinted:
        switching a failing job to ``"skip"`` keeps every shard already committed.
    :param max_bad_rows: under ``"skip"``, the most rows one shard may reject before it fails
        anyway: an int (a count) or a float below 1 (a fraction of the shard's rows); None: no limit.
    :param gpu_hour_price: what one GPU-hour costs (any currency): with it, ``_SUCCESS``, the
        status page, ``airflow-batch status`` and the finalize log show the job's cost,
        ``gpu_seconds / 3600 * gpu_hour_price`` (``docs/counting.md``). Not fingerprinted: a
        new price never recomputes a shard.
    :param redrive_rejected: also compute again the rows committed shards rejected into
        ``_rejected/`` (after the predictor was fixed): one re-drive unit per rejected-rows file,
        committed like a shard (``domain/redrive.py``, ``docs/redrive.md``). Not fingerprinted
        (it changes which rows are tried again, not what a row computes to). A string
        ``"true"``/``"false"`` is taken too, so a template (``"{{ params.redrive_rejected }}"``)
        can set it per DAG run.

    Credentials are not part of the spec: the core takes storage options (s3fs style) next
    to it, and the Airflow layer's ``BatchSpec`` adds the connection they come from. The
    fields' defaults in one table, with links to what each changes: docs/reference.md.
    """

    source: str
    sink: str
    predictor: str
    predictor_kwargs: dict[str, Any] = field(default_factory=dict)
    source_format: str | None = None
    sink_format: str = "parquet"
    batch_size: int = 64
    batch_format: str = "numpy"
    columns: tuple[str, ...] | None = None
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD
    num_gpus: float = 0
    num_cpus: float = 1
    num_replicas: int | None = None
    min_replicas: int | None = None
    memory: int | None = None
    accelerator_type: str | None = None
    resources: dict[str, float] | None = None
    runtime_env: dict[str, Any] | None = None
    checkpoint_dir: str | None = None
    resume: bool = True
    max_retries: int = 3
    predictor_secrets: dict[str, str] = field(default_factory=dict)
    bad_rows: str = "fail"
    max_bad_rows: int | float | None = None
    input_schema: dict[str, str] | None = None
    output_schema: dict[str, str] | None = None
    gpu_hour_price: float | None = None
    redrive_rejected: bool | str = False
    #: deprecated name of ``num_replicas``, accepted when building (read ``num_replicas``)
    num_workers: InitVar[int | None] = None

    def __post_init__(self, num_workers: int | None = None) -> None:
        if num_workers is not None:
            if self.num_replicas is not None:
                raise BatchSpecError(both_given("num_workers", "num_replicas", "BatchSpec"))
            warn_renamed("num_workers", "num_replicas", "BatchSpec")
            object.__setattr__(self, "num_replicas", num_workers)
        _require_str(self, "source")
        _require_str(self, "sink")
        for name in ("source", "sink", "checkpoint_dir"):
            value = getattr(self, name)
            if isinstance(value, str) and value.strip():
                try:
                    object.__setattr__(self, name, local_path_of(value))
                except ValueError as err:
                    raise BatchSpecError(f"{name}: {err}") from None
        _require_str(self, "predictor")
        module, sep, cls = self.predictor.partition(":")
        if not sep or not module or not cls or not cls.isidentifier():
            raise BatchSpecError(
                f"predictor={self.predictor!r}: expected 'package.module:ClassName', "
                "e.g. 'airflow_batch_provider.predictors.sentence_embedding:SentenceEmbedder'"
            )
        if not isinstance(self.predictor_kwargs, dict):
            raise BatchSpecError(f"predictor_kwargs must be a dict, got {type(self.predictor_kwargs).__name__}")
        try:
            json.dumps(self.predictor_kwargs, sort_keys=True)
        except (TypeError, ValueError) as err:
            raise BatchSpecError(
                f"predictor_kwargs must be JSON-serialisable (they are fingerprinted and sent to Ray): {err}"
            ) from None
        source_format = self.source_format or infer_format(self.source)
        if source_format is None:
            raise BatchSpecError(
                f"source_format: cannot infer it from source={self.source!r}; "
                f"set source_format to one of {', '.join(SOURCE_FORMATS)}"
            )
        object.__setattr__(self, "source_format", source_format)
        _require_choice(self, "source_format", SOURCE_FORMATS)
        _require_choice(self, "sink_format", SINK_FORMATS)
        _require_choice(self, "batch_format", BATCH_FORMATS)
        if self.columns is not None:
            if isinstance(self.columns, str) or not all(isinstance(c, str) and c for c in self.columns):
                raise BatchSpecError(f"columns must be a list of column names, got {self.columns!r}")
            object.__setattr__(self, "columns", tuple(self.columns))
        _require_int(self, "batch_size", minimum=1)
        _require_int(self, "rows_per_shard", minimum=1)
        _require_int(self, "max_retries", minimum=0)
        for name in ("num_gpus", "num_cpus"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise BatchSpecError(f"{name} must be a number >= 0, got {value!r}")
        if self.num_gpus == 0 and self.num_cpus == 0:
            raise BatchSpecError("num_cpus and num_gpus are both 0: a model replica must request some resource")
        if self.num_replicas is not None:
            _require_int(self, "num_replicas", minimum=1)
        if self.min_replicas is not None:
            _require_int(self, "min_replicas", minimum=1)
            if self.num_replicas is not None and self.min_replicas > self.num_replicas:
                raise BatchSpecError(f"min_replicas={self.min_replicas} is above num_replicas={self.num_replicas}")
        _require_resource_shape(self)
        if not isinstance(self.resume, bool):
            raise BatchSpecError(f"resume must be true or false, got {self.resume!r}")
        if self.checkpoint_dir is not None:
            _require_str(self, "checkpoint_dir")
        secrets = self.predictor_secrets
        if not isinstance(secrets, dict) or not all(isinstance(k, str) and k and isinstance(v, str) and v for k, v in secrets.items()):
            raise BatchSpecError(f"predictor_secrets must map predictor argument names to references, e.g. "
                                 f"{{'api_key': 'conn:my_model_api'}}; got {type(secrets).__name__}")
        for name in ("input_schema", "output_schema"):
            _require_schema_shape(self, name)  # type names are parsed at plan time (pyarrow stays out of DAG parsing)
        _refuse_output_inside_source(self)
        clash = sorted(set(secrets) & set(self.predictor_kwargs))
        if clash:
            raise BatchSpecError(f"{clash} are in both predictor_kwargs and predictor_secrets; give each argument once")
        _require_choice(self, "bad_rows", BAD_ROW_POLICIES)
        object.__setattr__(self, "redrive_rejected", _flag(self.redrive_rejected, "redrive_rejected"))
        limit = self.max_bad_rows
        if limit is not None:
            if isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit < 0 or (isinstance(limit, float) and limit >= 1):
                raise BatchSpecError(
                    f"max_bad_rows must be a count (an int >= 0) or a fraction of a shard's rows (a float "
                    f"between 0 and 1), got {limit!r}"
                )
            if self.bad_rows != "skip":
                raise BatchSpecError("max_bad_rows is a limit of bad_rows='skip'; set bad_rows='skip' too")
        price = self.gpu_hour_price
        if price is not None and (isinstance(price, bool) or not isinstance(price, (int, float)) or not 0 <= price < float("inf")):
            raise BatchSpecError(f"gpu_hour_price must be a number >= 0 (what one GPU-hour costs), got {price!r}")

    def bad_row_limit(self, shard_rows: int) -> int | None:
        """How many rows a shard of ``shard_rows`` rows may reject (None: no limit)."""
        if self.bad_rows != "skip":
            return 0
        if self.max_bad_rows is None:
            return None
        if isinstance(self.max_bad_rows, float):
            return int(self.max_bad_rows * shard_rows)
        return self.max_bad_rows

    # -- derived values ---------------------------------------------------------------
    def replica_resources(self) -> dict[str, float]:
        """What one replica asks of a node, as Ray's scheduler counts it: ``CPU``, ``GPU``,
        ``memory``, the custom ``resources`` and ``accelerator_type:<name>`` (Ray's option asks
        for a sliver of that node resource). Only the amounts above 0 are listed."""
        wanted = {"CPU": float(self.num_cpus or 0), "GPU": float(self.num_gpus or 0), "memory": float(self.memory or 0)}
        wanted.update({name: float(amount) for name, amount in (self.resources or {}).items()})
        if self.accelerator_type:
            wanted[f"accelerator_type:{self.accelerator_type}"] = ACCELERATOR_SLIVER
        return {name: amount for name, amount in wanted.items() if amount > 0}

    @property
    def sink_root(self) -> str:
        return self.sink.rstrip("/")

    @property
    def checkpoint_root(self) -> str:
        return (self.checkpoint_dir or default_checkpoint_root(self.sink_root)).rstrip("/")

    def fingerprint_inputs(self) -> dict[str, Any]:
        """The values the fingerprint hashes, kept in the checkpoint to explain a mismatch."""
        values = {name: getattr(self, name) for name in FINGERPRINT_FIELDS}
        values["columns"] = list(self.columns) if self.columns is not None else None
        if self.predictor_secrets:  # their references, never their values (absent: earlier fingerprints hold)
            values["predictor_secrets"] = dict(sorted(self.predictor_secrets.items()))
        for name in ("input_schema", "output_schema"):  # declared schemas change rows; absent: earlier fingerprints hold
            if getattr(self, name) is not None:
                values[name] = getattr(self, name)
        return values

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.fingerprint_inputs())

    def with_runtime_env(self, default: dict[str, Any] | None) -> JobSpec:
        """This spec with ``default`` as its ``runtime_env`` when it has none (a host's default,
        such as the ``ray_batch`` connection's): the spec's own wins, whole (the two are not merged).
        Validated like the spec's own. Like the spec's own, it is not part of the fingerprint."""
        if self.runtime_env is not None or not default:
            return self
        return dataclasses.replace(self, runtime_env=default)

    # -- (de)serialisation --------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["columns"] = list(self.columns) if self.columns is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        """The spec a dict describes (old field names of ``RENAMED_FIELDS`` taken, with a warning)."""
        data = take_renamed(data, RENAMED_FIELDS, "BatchSpec", error=BatchSpecError)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BatchSpecError(f"unknown BatchSpec field(s) {unknown}; allowed: {sorted(known)}")
        return cls(**data)


def fingerprint_of(values: dict[str, Any]) -> str:
    canonical = json.dumps(values, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def describe_fingerprint_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    """Human-readable list of the fingerprinted fields that differ, e.g. for a stale sink."""
    changes = [
        f"{name}: {old.get(name)!r} -> {new.get(name)!r}"
        for name in sorted(set(old) | set(new))
        if old.get(name) != new.get(name)
    ]
    return "; ".join(changes) or "(no field differs; the fingerprint algorithm changed)"


def describe_runtime_env(env: dict[str, Any] | None) -> str:
    """A ``runtime_env`` for a log line: its keys, and the *names* of its ``env_vars`` (never their
    values, which may be tokens), e.g. ``working_dir, env_vars (HF_HOME, HF_TOKEN)``."""
    if not env:
        return "none"
    parts = []
    for key in sorted(env):
        value = env[key]
        parts.append(f"{key} ({', '.join(sorted(map(str, value)))})" if key == "env_vars" and isinstance(value, dict) else key)
    return ", ".join(parts)


def _source_root(source: str) -> str:
    """The directory (or file) a source names: a glob's fixed prefix, without trailing ``/``."""
    glob_at = min((i for i, ch in enumerate(source) if ch in "*?["), default=None)
    if glob_at is None:
        return source.rstrip("/")
    return source[:glob_at].rsplit("/", 1)[0]


def _normalised(url: str) -> str:
    if is_remote(url):
        return f"{protocol_of(url)}://{url.split('://', 1)[1].rstrip('/')}"
    return os.path.abspath(url)


def _refuse_output_inside_source(spec: JobSpec) -> None:
    """A sink or checkpoint dir under the source would be read back as input by the next run."""
    root = _normalised(_source_root(spec.source))
    for name, location in (("sink", spec.sink_root), ("checkpoint_dir", spec.checkpoint_root)):
        target = _normalised(location)
        if target == root or target.startswith(root.rstrip("/") + "/"):
            raise BatchSpecError(
                f"{name}={location!r} is inside source={spec.source!r}: the next plan would read the job's own "
                f"output as input. Put the {name} outside the source directory."
            )


def _require_resource_shape(spec: JobSpec) -> None:
    """``memory``, ``accelerator_type``, ``resources`` and ``runtime_env`` as Ray takes them."""
    if spec.memory is not None:
        _require_int(spec, "memory", minimum=1)
    if spec.accelerator_type is not None and (not isinstance(spec.accelerator_type, str) or not spec.accelerator_type.strip()):
        raise BatchSpecError(f"accelerator_type must be a name such as 'H100' or 'L4', got {spec.accelerator_type!r}")
    resources = spec.resources
    if resources is not None:
        if not isinstance(resources, dict) or not all(
            isinstance(k, str) and k and not isinstance(v, bool) and isinstance(v, (int, float)) and v > 0 for k, v in resources.items()
        ):
            raise BatchSpecError(f"resources must map custom Ray resource names to amounts > 0, e.g. {{'tpu_slice': 1}}; got {resources!r}")
        builtin = sorted(set(resources) & {"CPU", "GPU", "memory", "object_store_memory"})
        if builtin:
            raise BatchSpecError(f"resources holds {builtin}: set num_cpus, num_gpus or memory instead")
    env = spec.runtime_env
    if env is not None:
        if not isinstance(env, dict):
            raise BatchSpecError(f"runtime_env must be a dict as Ray takes it (e.g. {{'working_dir': '/path/to/code'}}), got {type(env).__name__}")
        try:
            json.dumps(env, sort_keys=True)
        except (TypeError, ValueError) as err:
            raise BatchSpecError(f"runtime_env must be JSON-serialisable (it travels with the spec): {err}") from None


def _require_schema_shape(spec: JobSpec, name: str) -> None:
    value = getattr(spec, name)
    if value is None:
        return
    if not isinstance(value, dict) or not value or not all(isinstance(k, str) and k and isinstance(v, str) and v for k, v in value.items()):
        raise BatchSpecError(f"{name} must map column names to Arrow type names, e.g. {{'id': 'int64', 'text': 'string'}}; got {value!r}")
    object.__setattr__(spec, name, dict(value))


def _require_str(spec: JobSpec, name: str) -> None:
    value = getattr(spec, name)
    if not isinstance(value, str) or not value.strip():
        raise BatchSpecError(f"{name} must be a non-empty string, got {value!r}")


def _flag(value: Any, name: str) -> bool | str:
    """A yes/no field that a template may set: a bool, ``"true"``/``"false"`` (any case, as a
    rendered ``{{ params.x }}`` gives it) or, before rendering, the template itself."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("true", "1", "yes"):
            return True
        if text in ("false", "0", "no", "", "none"):
            return False
        if "{{" in value or "{%" in value:
            return value  # a template: rendered (and read again) when the task runs
    raise BatchSpecError(f"{name} must be true or false (or a template that renders to one), got {value!r}")


def _require_choice(spec: JobSpec, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(spec, name)
    if value not in allowed:
        raise BatchSpecError(f"{name}={value!r} is not supported; allowed: {', '.join(allowed)}")


def _require_int(spec: JobSpec, name: str, *, minimum: int) -> None:
    value = getattr(spec, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise BatchSpecError(f"{name} must be an integer >= {minimum}, got {value!r}")


def __getattr__(name: str) -> Any:
    """``BatchSpec`` was this class's name; the DAG author's ``airflow_batch_provider.BatchSpec``
    (this spec plus the Airflow connection) keeps it."""
    if name == "BatchSpec":
        from airflow_batch_provider.core.renames import warn_renamed

        warn_renamed("BatchSpec", "JobSpec", __name__)
        return JobSpec
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
