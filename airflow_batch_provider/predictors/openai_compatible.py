"""Chat completions and embeddings from an OpenAI-compatible HTTP endpoint.

vLLM's and SGLang's servers, TGI's Messages API, OpenAI itself and most internal gateways
speak ``POST {base_url}/chat/completions`` and ``POST {base_url}/embeddings``. A batch
job calling one is bound by latency and rate limits, not compute, so each replica keeps
``max_concurrency`` requests in flight (a thread pool; a server like vLLM batches them) and
rides out what a busy endpoint answers:

* ``429`` and ``5xx`` (and 408/409/425) are retried up to ``max_retries`` times, after the
  server's ``Retry-After`` when it sends one (seconds or an HTTP date), else after an
  exponential backoff with jitter; so are timeouts and connections dropped mid-answer;
* a row whose request fails for good (a ``400`` for that prompt, retries exhausted) fails
  alone: the predictor raises :class:`~airflow_batch_provider.core.errors.RowsFailed`
  naming it, the job's ``bad_rows`` policy takes it (``_rejected/`` under ``"skip"``), the
  other rows' answers are kept and no request is sent twice;
* what no row is at fault for (the key refused: 401/403; the endpoint or model not found:
  404; nothing listening; every row of a batch failing) raises
  :class:`~airflow_batch_provider.core.errors.PredictorUnavailableError`, which fails the
  shard under both policies (Airflow's retry runs it again) rather than reject every row.

The API key comes through ``predictor_secrets={"api_key": "conn:<id>"}`` (or ``"var:<key>"``):
it travels only in the ``Authorization`` header, and no message built here quotes a header.

Each output row has the answer, ``finish_reason`` and the tokens the server counted in its
``usage`` (``tokens_in``, ``tokens_out``), beside ``keep_columns``. The shard's counters
(``docs/counting.md``) get the tokens of every answer and the ``requests``, ``retries``,
``throttled`` (429s) and ``waited_s`` (seconds slept before retries) of its batches. A null prompt gives a row of
nulls without a request. Rows are sent as the batch arrives; make ``batch_size`` a few times
``max_concurrency`` so one slow answer does not leave the other slots idle for long.
"""

from __future__ import annotations

import contextvars
import email.utils
import json
import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from airflow_batch_provider.core import counters, tunables
from airflow_batch_provider.core.errors import PredictorError, PredictorUnavailableError, RowsFailed

#: Statuses a later try may answer differently: rate limits, timeouts, conflicts, server errors.
RETRY_STATUSES = frozenset({408, 409, 425, 429})


@dataclass
class Failure:
    """One row's request that failed for good, with why (never a header, so never the key)."""

    message: str
    #: whether a try could have succeeded (retries exhausted) rather than the row being refused
    transient: bool = False


class Endpoint:
    """POSTs JSON to an OpenAI-compatible server, retrying what may pass on a later try.

    Thread-safe: one ``httpx.Client`` (its pool holds ``max_concurrency`` connections) serves
    every thread of the replica."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        max_concurrency: int,
        max_retries: int,
        timeout_s: float,
        connect_timeout_s: float,
        backoff_first_s: float,
        backoff_max_s: float,
        retry_after_max_s: float,
        headers: dict[str, str] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        import httpx

        self._httpx = httpx
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise PredictorError(f"base_url={base_url!r} must be an http:// or https:// URL, e.g. http://vllm:8000/v1")
        self.base_url = base_url.rstrip("/")
        sent = {"Content-Type": "application/json", **(headers or {})}
        self._secret = api_key or None  # only to take it out of a server's error body that quotes it
        if api_key:
            sent["Authorization"] = f"Bearer {api_key}"
        limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)
        self._client = httpx.Client(
            headers=sent, timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s), limits=limits,
        )
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_first_s = backoff_first_s
        self.backoff_max_s = backoff_max_s
        self.retry_after_max_s = retry_after_max_s
        self._sleep = sleep
        self._lock = threading.Lock()
        #: what this replica's requests met so far (for tests, benchmarks and counters)
        self.counts = {"requests": 0, "retries": 0, "throttled": 0, "waited_s": 0.0}
        _quiet_httpx_request_log()

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any] | Failure:
        """The server's JSON answer, or the :class:`Failure` of a request that cannot succeed.
        Raises :class:`PredictorUnavailableError` when no request can (key refused, nothing there)."""
        url = f"{self.base_url}/{path.lstrip('/')}"
        httpx = self._httpx
        tries = 0
        while True:
            tries += 1
            retry_after = None
            self._count("requests")
            try:
                response = self._client.post(url, content=json.dumps(body).encode())
                status = response.status_code
                if status < 300:
                    try:
                        answer = response.json()
                    except ValueError:
                        problem = self._hide(f"HTTP {status} with a body that is not JSON: {response.text[:tunables.HOSTED_ERROR_CHARS]!r}")
                    else:
                        _count_usage(answer)
                        return answer
                else:
                    detail = self._hide(_error_detail(response))
                    if status in (401, 403):
                        raise PredictorUnavailableError(
                            f"{url} refused the API key (HTTP {status}: {detail}); check the key that "
                            "predictor_secrets={'api_key': 'conn:...'} names (a connection's password, or a Variable)"
                        )
                    if status == 404:
                        raise PredictorUnavailableError(
                            f"{url} answered HTTP 404 ({detail}); check base_url (it ends before /chat/completions, "
                            "e.g. http://host:8000/v1) and the model name"
                        )
                    problem = f"HTTP {status}: {detail}"
                    if status not in RETRY_STATUSES and status < 500:
                        return Failure(f"{url} refused the request: {problem}")
                    if status == 429:
                        self._count("throttled")
                    retry_after = self._retry_after(response.headers.get("retry-after"))
            except httpx.ConnectError as err:
                if tries > self.max_retries:
                    raise PredictorUnavailableError(
                        f"cannot connect to {url} ({type(err).__name__}: {err}) after {tries} tries; is the server up "
                        "and reachable from the Ray nodes?"
                    ) from None
                problem = f"cannot connect ({type(err).__name__})"
            except httpx.TimeoutException as err:
                problem = f"no answer within the timeout ({type(err).__name__}, timeout_s={self.timeout_s})"
            except httpx.TransportError as err:  # the connection dropped mid-answer, a malformed answer
                problem = f"the connection failed mid-request ({type(err).__name__}: {err})"
            if tries > self.max_retries:
                return Failure(f"{url}: {problem}; gave up after {tries} tries (max_retries={self.max_retries})", transient=True)
            wait = retry_after if retry_after is not None else self._backoff(tries)
            self._count("retries")
            self._count("waited_s", wait)
            self._sleep(wait)

    def _hide(self, text: str) -> str:
        """``text`` without the API key: a gateway's error may quote the header it refused."""
        return text.replace(self._secret, "***") if self._secret else text

    def _backoff(self, tries: int) -> float:
        """Exponential, with 'equal jitter': half the step fixed, half at random."""
        step = min(self.backoff_max_s, self.backoff_first_s * 2 ** (tries - 1))
        return step / 2 + random.uniform(0, step / 2)

    def _retry_after(self, value: str | None) -> float | None:
        """``Retry-After`` in seconds (a number, or an HTTP date), at most ``retry_after_max_s``,
        with up to 10% added so replicas told the same time do not all return at once."""
        if not value:
            return None
        try:
            seconds = float(value)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError):
                return None
            seconds = when.timestamp() - time.time()
        seconds = min(max(seconds, 0.0), self.retry_after_max_s)
        return seconds * (1 + random.uniform(0, 0.1))

    def _count(self, name: str, amount: float = 1) -> None:
        with self._lock:
            self.counts[name] += amount
        counters.add(name, amount)  # the shard's too: requests, retries, throttled, waited_s

    def close(self) -> None:
        self._client.close()


def _count_usage(answer: Any) -> None:
    """The tokens the server counted for one answer (its ``usage``), into the shard's counters:
    what it bills, rows whose answer is later found malformed included."""
    usage = answer.get("usage") if isinstance(answer, dict) else None
    if not isinstance(usage, dict):
        return
    for field, name in (("prompt_tokens", "tokens_in"), ("completion_tokens", "tokens_out")):
        value = usage.get(field)
        if isinstance(value, int) and not isinstance(value, bool):
            counters.add(name, value)


def _error_detail(response: Any) -> str:
    """The server's own error message (OpenAI's ``{"error": {"message": ...}}``, TGI's
    ``{"error": ...}``), else the start of its body."""
    text = response.text
    try:
        parsed = json.loads(text)
        error = parsed.get("error", parsed) if isinstance(parsed, dict) else parsed
        message = error.get("message", error) if isinstance(error, dict) else error
        text = message if isinstance(message, str) else json.dumps(message)
    except ValueError:
        pass
    text = " ".join(text.split())
    limit = tunables.HOSTED_ERROR_CHARS
    return text[:limit] + ("..." if len(text) > limit else "") if text else "(empty body)"


def _quiet_httpx_request_log() -> None:
    """httpx logs every request at INFO: a million rows would be a million log lines. Left
    alone when the deployment has set httpx's level itself."""
    logger = logging.getLogger("httpx")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.WARNING)


def column_values(batch: Any, name: str) -> list[Any]:
    """A column of any batch format as Python values (None for a null)."""
    if isinstance(batch, pa.Table):
        return batch.column(name).to_pylist()
    if isinstance(batch, dict):
        values = batch[name]
        if isinstance(values, np.ndarray):
            return [v.tolist() if isinstance(v, np.ndarray) else v for v in values.tolist()]
        return list(values.to_pylist() if hasattr(values, "to_pylist") else values)
    column = batch[name]  # pandas
    return [None if _is_na(v) else v for v in column.tolist()]


def _is_na(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value) or type(value).__name__ in ("NAType", "NaTType")


def arrow_column(batch: Any, name: str) -> pa.Array | pa.ChunkedArray:
    """A kept input column as Arrow, its type unchanged where the format allows."""
    if isinstance(batch, pa.Table):
        return batch.column(name)
    if isinstance(batch, dict):
        values = batch[name]
        if isinstance(values, np.ndarray) and values.ndim == 1 and values.dtype != object:
            return pa.array(values)
        return pa.array(column_values(batch, name))
    return pa.Array.from_pandas(batch[name])


def _batch_columns(batch: Any) -> list[str]:
    if isinstance(batch, pa.Table):
        return batch.column_names
    return list(batch.keys()) if isinstance(batch, dict) else list(batch.columns)


class _HostedPredictor:
    """What chat and embeddings share: the endpoint, the pool, keep_columns and failures."""

    def __init__(self, base_url: str, model: str, api_key: str | None, keep_columns: list[str] | None,
                 max_concurrency: int | None, max_retries: int | None, timeout_s: float | None,
                 headers: dict[str, str] | None, backoff_first_s: float | None, backoff_max_s: float | None,
                 retry_after_max_s: float | None, connect_timeout_s: float | None):
        if not model or not isinstance(model, str):
            raise PredictorError(f"{type(self).__name__}: model must be the served model's name, got {model!r}")
        concurrency = max_concurrency if max_concurrency is not None else tunables.HOSTED_CONCURRENCY
        if not isinstance(concurrency, int) or concurrency < 1:
            raise PredictorError(f"{type(self).__name__}: max_concurrency must be an integer >= 1, got {concurrency!r}")
        self.model = model
        self.keep_columns = list(keep_columns or [])
        self.max_concurrency = concurrency
        self.endpoint = Endpoint(
            base_url, api_key, max_concurrency=concurrency,
            max_retries=tunables.HOSTED_MAX_RETRIES if max_retries is None else int(max_retries),
            timeout_s=timeout_s or tunables.HOSTED_TIMEOUT_S,
            connect_timeout_s=connect_timeout_s or tunables.HOSTED_CONNECT_TIMEOUT_S,
            backoff_first_s=tunables.HOSTED_BACKOFF_FIRST_S if backoff_first_s is None else backoff_first_s,
            backoff_max_s=tunables.HOSTED_BACKOFF_MAX_S if backoff_max_s is None else backoff_max_s,
            retry_after_max_s=tunables.HOSTED_RETRY_AFTER_MAX_S if retry_after_max_s is None else retry_after_max_s,
            headers=headers,
        )
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="abp-hosted")

    def _check_columns(self, batch: Any, needed: list[str]) -> None:
        present = _batch_columns(batch)
        missing = [c for c in needed + self.keep_columns if c not in present]
        if missing:
            raise PredictorError(
                f"{type(self).__name__}: column(s) {missing} are not in the input batch (it has {sorted(present)}); "
                "fix predictor_kwargs or BatchSpec.columns"
            )

    def _finish(self, batch: Any, rows: int, answers: dict[str, list[Any]], types: dict[str, pa.DataType],
                failures: dict[int, Failure]) -> pa.Table:
        """The output table of the rows that did not fail; raises :class:`RowsFailed` (carrying
        that table) when some did, or :class:`PredictorUnavailableError` when all did."""
        kept = [i for i in range(rows) if i not in failures]
        if failures and not kept and rows > 1 and all(f.transient for f in failures.values()):
            first = failures[min(failures)]
            raise PredictorUnavailableError(f"every one of the batch's {rows} requests failed; the first: {first.message}")
        columns: dict[str, Any] = {}
        take = pa.array(kept, type=pa.int64())
        for name in self.keep_columns:
            columns[name] = arrow_column(batch, name).take(take)
        for name, values in answers.items():
            columns[name] = pa.array([values[i] for i in kept], type=types[name])
        table = pa.table(columns)
        if failures:
            raise RowsFailed({i: f.message for i, f in failures.items()}, output=table)
        return table

    def _run_all(self, call: Callable[[int], Any], indexes: list[int]) -> dict[int, Any]:
        return dict(zip(indexes, self._map(call, indexes), strict=True))

    def _map(self, call: Callable[[Any], Any], items: list[Any]) -> list[Any]:
        """``call`` over ``items`` on the pool, each in a copy of the calling thread's context,
        so that what the pool's threads count reaches the shard's counters (``counters.add``)."""
        jobs = [(contextvars.copy_context(), item) for item in items]
        return list(self._pool.map(lambda job: job[0].run(call, job[1]), jobs))

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self.endpoint.close()

    def __del__(self) -> None:  # pragma: no cover - interpreter shutdown
        try:
            self.close()
        except Exception:
            pass


class OpenAIChat(_HostedPredictor):
    """One chat completion per row, from an OpenAI-compatible ``/chat/completions``.

    :param base_url: the API root, e.g. ``http://vllm:8000/v1`` or ``https://api.openai.com/v1``.
    :param model: the served model's name (vLLM's ``--served-model-name``, OpenAI's model id).
    :param api_key: the bearer token; give it through ``predictor_secrets``, never ``predictor_kwargs``.
    :param prompt_column: a text column, sent as the user's message.
    :param messages_column: instead of ``prompt_column``: a column of chat messages per row
        (a list of ``{"role": ..., "content": ...}``, or that list as a JSON string).
    :param system_prompt: a system message put before each row's messages.
    :param max_tokens: the most tokens the model generates per row.
    :param sampling: more request fields as they are (``temperature``, ``top_p``, ``seed``,
        ``stop``, vLLM's ``top_k``...).
    :param output_column: the answer's column; ``finish_reason``, ``tokens_in``, ``tokens_out``
        are beside it.
    :param keep_columns: input columns copied to the output (e.g. the row id).
    :param max_concurrency: requests in flight per replica.
    :param max_retries: tries after the first for a 429/5xx, a timeout or a dropped connection.
    :param timeout_s: one request's read timeout.
    :param headers: more request headers (not secrets: those go in ``predictor_secrets``).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        prompt_column: str | None = "prompt",
        messages_column: str | None = None,
        system_prompt: str | None = None,
        max_tokens: int | None = None,
        sampling: dict[str, Any] | None = None,
        output_column: str = "text",
        keep_columns: list[str] | None = None,
        max_concurrency: int | None = None,
        max_retries: int | None = None,
        timeout_s: float | None = None,
        headers: dict[str, str] | None = None,
        backoff_first_s: float | None = None,
        backoff_max_s: float | None = None,
        retry_after_max_s: float | None = None,
        connect_timeout_s: float | None = None,
    ):
        super().__init__(base_url, model, api_key, keep_columns, max_concurrency, max_retries, timeout_s, headers,
                         backoff_first_s, backoff_max_s, retry_after_max_s, connect_timeout_s)
        self.column = messages_column or prompt_column
        if not self.column:
            raise PredictorError("OpenAIChat: give prompt_column (a text column) or messages_column (chat messages per row)")
        self.messages_mode = messages_column is not None
        self.system_prompt = system_prompt
        self.request_fields = dict(sampling or {})
        if max_tokens is not None:
            self.request_fields["max_tokens"] = int(max_tokens)
        self.output_column = output_column

    def __call__(self, batch: Any) -> pa.Table:
        self._check_columns(batch, [self.column])
        values = column_values(batch, self.column)
        rows = len(values)
        text: list[Any] = [None] * rows
        finish: list[Any] = [None] * rows
        tokens_in: list[Any] = [None] * rows
        tokens_out: list[Any] = [None] * rows
        failures: dict[int, Failure] = {}
        bodies: dict[int, dict[str, Any]] = {}
        for index, value in enumerate(values):
            if value is None:
                continue  # a null prompt: a row of nulls, no request
            try:
                bodies[index] = self._body(value)
            except ValueError as err:
                failures[index] = Failure(str(err))
        answers = self._run_all(lambda i: self.endpoint.post("chat/completions", bodies[i]), list(bodies))
        for index, answer in answers.items():
            if isinstance(answer, Failure):
                failures[index] = answer
                continue
            try:
                choice = answer["choices"][0]
                text[index] = (choice.get("message") or {}).get("content")
                finish[index] = choice.get("finish_reason")
            except (KeyError, IndexError, TypeError, AttributeError):
                failures[index] = Failure(f"the answer has no choices[0].message: {json.dumps(answer)[:tunables.HOSTED_ERROR_CHARS]}")
                continue
            usage = answer.get("usage") or {}
            tokens_in[index] = usage.get("prompt_tokens")
            tokens_out[index] = usage.get("completion_tokens")
        return self._finish(
            batch, rows,
            {self.output_column: text, "finish_reason": finish, "tokens_in": tokens_in, "tokens_out": tokens_out},
            {self.output_column: pa.string(), "finish_reason": pa.string(), "tokens_in": pa.int64(), "tokens_out": pa.int64()},
            failures,
        )

    def _body(self, value: Any) -> dict[str, Any]:
        if self.messages_mode:
            messages = json.loads(value) if isinstance(value, str) else value
            if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
                raise ValueError(f"{self.column!r} must hold a list of {{'role': ..., 'content': ...}} messages, got {str(value)[:200]!r}")
        else:
            messages = [{"role": "user", "content": str(value)}]
        if self.system_prompt:
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        return {"model": self.model, "messages": messages, **self.request_fields}


class OpenAIEmbeddings(_HostedPredictor):
    """Embeddings from an OpenAI-compatible ``/embeddings``, ``inputs_per_request`` texts per
    request, into a fixed-size ``embedding`` column (``tokens_in`` from ``usage``, per request
    shared out evenly). When a request of several texts is refused (a 400: one text too long),
    its texts are sent one by one so only the refused one fails.

    :param text_column: the text to embed; a null gives a null embedding.
    :param dimensions: asked of models that can shorten their vectors (``text-embedding-3-*``).
    The other parameters are :class:`OpenAIChat`'s.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        text_column: str = "text",
        inputs_per_request: int = 32,
        dimensions: int | None = None,
        keep_columns: list[str] | None = None,
        max_concurrency: int | None = None,
        max_retries: int | None = None,
        timeout_s: float | None = None,
        headers: dict[str, str] | None = None,
        backoff_first_s: float | None = None,
        backoff_max_s: float | None = None,
        retry_after_max_s: float | None = None,
        connect_timeout_s: float | None = None,
    ):
        super().__init__(base_url, model, api_key, keep_columns, max_concurrency, max_retries, timeout_s, headers,
                         backoff_first_s, backoff_max_s, retry_after_max_s, connect_timeout_s)
        self.text_column = text_column
        self.inputs_per_request = max(1, int(inputs_per_request))
        self.dimensions = dimensions

    def __call__(self, batch: Any) -> pa.Table:
        self._check_columns(batch, [self.text_column])
        values = column_values(batch, self.text_column)
        rows = len(values)
        present = [i for i, v in enumerate(values) if v is not None]
        groups = [present[s:s + self.inputs_per_request] for s in range(0, len(present), self.inputs_per_request)]
        results: dict[int, Any] = {}
        for group, answer in zip(groups, self._map(lambda g: self._embed(g, values), groups), strict=True):
            if isinstance(answer, Failure) and len(group) > 1 and not answer.transient:
                answer = None  # refused as a whole: each text alone, below
            results.update(self._spread(group, answer))
        alone = [i for i, r in results.items() if r is None]
        results.update(self._run_all(lambda i: self._spread([i], self._embed([i], values))[i], alone))
        failures = {i: r for i, r in results.items() if isinstance(r, Failure)}
        vectors = {i: r for i, r in results.items() if not isinstance(r, Failure)}
        width = len(next(iter(vectors.values()))[0]) if vectors else (self.dimensions or 0)
        if any(len(v[0]) != width for v in vectors.values()):
            raise PredictorError(f"OpenAIEmbeddings: the server answered vectors of different lengths ({width} and others)")
        embedding: list[Any] = [vectors[i][0] if i in vectors else None for i in range(rows)]
        tokens: list[Any] = [vectors[i][1] if i in vectors else None for i in range(rows)]
        return self._finish(batch, rows, {"embedding": embedding, "tokens_in": tokens},
                            {"embedding": pa.list_(pa.float32(), width), "tokens_in": pa.int64()}, failures)

    def _embed(self, group: list[int], values: list[Any]) -> dict[str, Any] | Failure:
        body: dict[str, Any] = {"model": self.model, "input": [str(values[i]) for i in group]}
        if self.dimensions:
            body["dimensions"] = int(self.dimensions)
        return self.endpoint.post("embeddings", body)

    @staticmethod
    def _spread(group: list[int], answer: dict[str, Any] | Failure | None) -> dict[int, Any]:
        """Each row's (vector, tokens), its Failure, or None (to be sent alone)."""
        if answer is None or isinstance(answer, Failure):
            return {i: answer for i in group}
        try:
            data = sorted(answer["data"], key=lambda d: d.get("index", 0))
            vectors = [d["embedding"] for d in data]
        except (KeyError, TypeError, AttributeError):
            return {i: Failure(f"the answer has no data[].embedding: {json.dumps(answer)[:200]}") for i in group}
        if len(vectors) != len(group):
            return {i: Failure(f"sent {len(group)} texts, the server answered {len(vectors)} embeddings") for i in group}
        total = (answer.get("usage") or {}).get("prompt_tokens")
        share = None if total is None else -(-int(total) // len(group))
        return {i: (vector, share) for i, vector in zip(group, vectors, strict=True)}
