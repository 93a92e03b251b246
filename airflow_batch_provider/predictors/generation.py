"""LLM text generation: a prompt column, a template over columns, or chat messages -> generated text.

Two engines behind one predictor, chosen once per replica:

* **vLLM** (``pip install 'airflow-batch-provider[llm-vllm]'``) where CUDA and ``vllm`` are
  importable: continuous batching keeps the GPU busy, which is why users pick it. This path
  has NOT been run in the provider's tests (they run without a GPU); treat it as untested.
* **transformers' ``generate``** everywhere else (CPU, or a GPU without vLLM): the batch is
  left-padded (decoder-only models continue from the last position, so padding must come
  first) and generated in one call.

Both engines see the same token ids: prompts are built and tokenized here with the model's own
tokenizer (its chat template for chat input), so ``tokens_in`` means the same on either, and a
row's prompt does not depend on which engine runs it.

Every row gets ``generated_text``, ``tokens_in``, ``tokens_out`` (generated tokens, the end of
sequence token included when the model stopped) and ``finish_reason`` (``"stop"``: the model
ended the text; ``"length"``: ``max_new_tokens`` cut it). The shard's counters
(``docs/counting.md``) get the sums of ``tokens_in`` and ``tokens_out``. A null prompt (or a null column a
template uses, or null messages) gives nulls in all four, never the generation of "None".
"""

from __future__ import annotations

import importlib.util
import json
import os
import string
from typing import Any

import numpy as np
import pyarrow as pa

from airflow_batch_provider import counters

ENGINES = ("auto", "transformers", "vllm")


class TextGenerator:
    """Generates text for each row; see the module docstring for the engines and output columns.

    Input, one of (checked in this order):

    :param messages_column: a column of chat messages per row (a list of ``{"role", "content"}``,
        or its JSON string), rendered with the model's chat template.
    :param prompt_template: a ``str.format`` template over columns, e.g. ``"Summarise: {text}"``.
    :param prompt_column: a column with the prompt text (default ``"prompt"``).
    :param chat: wrap a prompt (column or template) as one user message and render it with the
        model's chat template (for instruction-tuned models); ``system_prompt`` goes first.

    Sampling:

    :param max_new_tokens: most tokens generated per row (``finish_reason="length"`` when hit).
    :param temperature: 0 is greedy decoding (deterministic); above 0 samples.
    :param top_p: nucleus sampling mass (1.0: off).
    :param seed: makes sampling reproducible: vLLM seeds each row; transformers seeds each
        batch, so a re-run gives the same text for the same batches (the plan fixes shards and
        ``batch_size``, so a retried shard sees the same batches).

    Output and placement:

    :param keep_columns: input columns copied to the output (e.g. the row id).
    :param output_column: name of the generated text column.
    :param engine: ``"auto"`` (vLLM where CUDA and vllm are importable, else transformers),
        ``"transformers"`` or ``"vllm"``.
    :param device: transformers' device; default CUDA when Ray gave this replica a GPU, else CPU.
    :param dtype: model weights' dtype (``"float16"``, ``"bfloat16"``, ``"float32"``); default
        the model's own for vLLM, float32 on CPU and bfloat16 on CUDA for transformers.
    :param engine_kwargs: passed to ``vllm.LLM`` (e.g. ``gpu_memory_utilization``,
        ``max_model_len``, ``tensor_parallel_size``); ignored by transformers.
    """

    def __init__(
        self,
        model: str,
        prompt_column: str = "prompt",
        prompt_template: str | None = None,
        messages_column: str | None = None,
        chat: bool = False,
        system_prompt: str | None = None,
        keep_columns: list[str] | None = None,
        output_column: str = "generated_text",
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        engine: str = "auto",
        device: str | None = None,
        dtype: str | None = None,
        engine_kwargs: dict[str, Any] | None = None,
    ):
        if engine not in ENGINES:
            raise ValueError(f"engine={engine!r}: use one of {ENGINES}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}: must be at least 1")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"temperature={temperature}, top_p={top_p}: need temperature >= 0 and 0 < top_p <= 1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.prompt_column = prompt_column
        self.prompt_template = prompt_template
        self.template_fields = _template_fields(prompt_template) if prompt_template is not None else []
        self.messages_column = messages_column
        self.chat = chat or messages_column is not None
        self.system_prompt = system_prompt
        self.keep_columns = list(keep_columns) if keep_columns is not None else ["id"]
        self.output_column = output_column
        self.max_new_tokens = int(max_new_tokens)
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.seed = seed
        self.engine_name = _pick_engine(engine)
        if self.engine_name == "vllm":
            self.engine: _Engine = _VllmEngine(model, dtype, engine_kwargs or {})
        else:
            self.engine = _TransformersEngine(model, device, dtype)
        self.tokenizer = self.engine.tokenizer
        if self.chat and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(
                f"model {model!r} has no chat template, so chat=True / messages_column cannot render messages; "
                "use a prompt_column or prompt_template without chat, or a model whose tokenizer has a chat_template"
            )

    def __call__(self, batch: Any) -> dict[str, Any]:
        rows = _num_rows(batch)
        prompts = self._prompt_ids(batch, rows)
        present = [i for i, ids in enumerate(prompts) if ids is not None]
        texts: list[str | None] = [None] * rows
        tokens_in: list[int | None] = [None] * rows
        tokens_out: list[int | None] = [None] * rows
        reasons: list[str | None] = [None] * rows
        if present:
            results = self.engine.generate(
                [prompts[i] for i in present], self.max_new_tokens, self.temperature, self.top_p, self.seed
            )
            for i, (text, generated, reason) in zip(present, results, strict=True):
                texts[i], tokens_in[i], tokens_out[i], reasons[i] = text, len(prompts[i]), generated, reason
            counters.add("tokens_in", sum(tokens_in[i] for i in present))
            counters.add("tokens_out", sum(tokens_out[i] for i in present))
        output: dict[str, Any] = {name: _keep(batch, name) for name in self.keep_columns}
        output[self.output_column] = pa.array(texts, pa.string())
        output["tokens_in"] = pa.array(tokens_in, pa.int64())
        output["tokens_out"] = pa.array(tokens_out, pa.int64())
        output["finish_reason"] = pa.array(reasons, pa.string())
        return output

    # -- prompts -------------------------------------------------------------------------------
    def _prompt_ids(self, batch: Any, rows: int) -> list[list[int] | None]:
        """Token ids per row (None for a null prompt), built the same way for either engine."""
        if self.messages_column is not None:
            texts = [self._render(_messages(m)) if not _is_null(m) else None for m in _values(batch, self.messages_column)]
        else:
            texts = self._prompt_texts(batch, rows)
            if self.chat:
                texts = [self._render([{"role": "user", "content": t}]) if t is not None else None for t in texts]
        # A rendered chat template carries its own special tokens (BOS...); plain text gets the tokenizer's.
        encoded = self.tokenizer(
            [t for t in texts if t is not None], add_special_tokens=not self.chat
        )["input_ids"] if any(t is not None for t in texts) else []
        found = iter(encoded)
        prompts = [list(next(found)) if t is not None else None for t in texts]
        for row, ids in enumerate(prompts):
            if ids == []:  # raising lets bad_rows="skip" reject just this row
                raise ValueError(f"row {row}: the prompt is empty after tokenizing (the tokenizer adds no BOS token)")
        return prompts

    def _prompt_texts(self, batch: Any, rows: int) -> list[str | None]:
        if self.prompt_template is None:
            return [None if _is_null(v) else str(v) for v in _values(batch, self.prompt_column)]
        columns = {name: _values(batch, name) for name in self.template_fields}
        texts: list[str | None] = []
        for i in range(rows):
            row = {name: values[i] for name, values in columns.items()}
            texts.append(None if any(_is_null(v) for v in row.values()) else self.prompt_template.format_map(row))
        return texts

    def _render(self, messages: list[dict[str, Any]]) -> str:
        if self.system_prompt is not None and not (messages and messages[0].get("role") == "system"):
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# -- engines -----------------------------------------------------------------------------------
class _Engine:
    tokenizer: Any

    def generate(
        self, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float, seed: int | None
    ) -> list[tuple[str, int, str]]:
        """(text, generated token count, finish reason) per prompt, in order."""
        raise NotImplementedError


class _TransformersEngine(_Engine):
    """transformers' ``generate`` on one device; the batch is left-padded into one call."""

    def __init__(self, model: str, device: str | None, dtype: str | None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a replica's log is per shard: no weight-loading bars in it
        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        chosen = dtype or ("bfloat16" if self.device.startswith("cuda") else "float32")
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, chosen)).to(self.device).eval()
        config = self.model.generation_config
        eos = config.eos_token_id if config.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = config.pad_token_id if config.pad_token_id is not None else min(self.eos_ids, default=0)
        self.pad_id = int(pad)

    def generate(self, prompts, max_new_tokens, temperature, top_p, seed):
        torch = self.torch
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):  # left padding: every row's last prompt token is in the last column
            if ids:
                input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
                attention[row, width - len(ids):] = 1
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {
            "do_sample": False, "temperature": None, "top_p": None, "top_k": None,
        }
        if seed is not None:
            torch.manual_seed(seed)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention.to(self.device),
                max_new_tokens=max_new_tokens,
                pad_token_id=self.pad_id,
                eos_token_id=sorted(self.eos_ids) or None,
                **sampling,
            )
        new = out[:, width:].cpu().tolist()
        results = []
        for tokens in new:
            stop = next((i for i, t in enumerate(tokens) if t in self.eos_ids), None)
            kept = tokens if stop is None else tokens[:stop]
            text = self.tokenizer.decode(kept, skip_special_tokens=True)
            results.append((text, len(kept) if stop is None else stop + 1, "length" if stop is None else "stop"))
        return results


class _VllmEngine(_Engine):
    """vLLM's offline ``LLM``; UNTESTED in this repository's test suite (it needs a GPU)."""

    def __init__(self, model: str, dtype: str | None, engine_kwargs: dict[str, Any]):
        from vllm import LLM

        self.llm = LLM(model=model, dtype=dtype or "auto", **engine_kwargs)
        self.tokenizer = self.llm.get_tokenizer()

    def generate(self, prompts, max_new_tokens, temperature, top_p, seed):
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
        results = []
        for output in outputs:
            completion = output.outputs[0]
            # vLLM says "stop" for EOS and stop strings, "length" for max_tokens; anything else ("abort") as it is
            results.append((completion.text, len(completion.token_ids), str(completion.finish_reason)))
        return results


def _pick_engine(engine: str) -> str:
    if engine != "auto":
        if engine == "vllm" and importlib.util.find_spec("vllm") is None:
            raise ImportError("engine='vllm' needs vLLM: pip install 'airflow-batch-provider[llm-vllm]' (CUDA only)")
        return engine
    if importlib.util.find_spec("vllm") is None:
        return "transformers"
    import torch

    return "vllm" if torch.cuda.is_available() else "transformers"


# -- batch access, any batch format ---------------------------------------------------------------
def _num_rows(batch: Any) -> int:
    if isinstance(batch, dict):
        return len(next(iter(batch.values()))) if batch else 0
    return int(batch.num_rows if hasattr(batch, "num_rows") else len(batch))


def _values(batch: Any, name: str) -> list[Any]:
    """One column as a Python list from a numpy dict, a pandas DataFrame or a pyarrow Table."""
    try:
        column = batch[name] if not isinstance(batch, pa.Table) else batch.column(name)
    except KeyError:
        raise KeyError(f"the batch has no column {name!r}; it has {list(_column_names(batch))}") from None
    if hasattr(column, "to_pylist"):
        return column.to_pylist()
    return list(column.tolist() if hasattr(column, "tolist") else column)


def _column_names(batch: Any) -> list[str]:
    if isinstance(batch, pa.Table):
        return batch.column_names
    return list(batch.keys()) if isinstance(batch, dict) else list(batch.columns)


def _keep(batch: Any, name: str) -> Any:
    if name not in _column_names(batch):
        raise KeyError(
            f"keep_columns names {name!r}, which the batch has not; it has {list(_column_names(batch))} "
            "(keep_columns=[] keeps none)"
        )
    if isinstance(batch, (dict, pa.Table)):
        return batch[name] if isinstance(batch, dict) else batch.column(name)
    return pa.Array.from_pandas(batch[name])  # pandas: nullable dtypes stay nulls


def _is_null(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and np.isnan(value):
        return True
    try:
        import pandas as pd

        return value is pd.NA or value is pd.NaT
    except ImportError:  # pragma: no cover - pandas is a dependency
        return False


def _messages(value: Any) -> list[dict[str, Any]]:
    """A row's chat messages: a list of ``{"role", "content"}`` (numpy/pandas give arrays) or its JSON."""
    if isinstance(value, str):
        value = json.loads(value)
    messages = [dict(m) for m in (value.tolist() if isinstance(value, np.ndarray) else value)]
    if not all("role" in m and "content" in m for m in messages):
        raise ValueError(f"chat messages need a 'role' and a 'content' each; got {messages[:2]}")
    return messages


def _template_fields(template: str) -> list[str]:
    fields = []
    for _, field, _, _ in string.Formatter().parse(template):
        if field is not None:
            name = field.split(".")[0].split("[")[0]
            if not name or name.isdigit():
                raise ValueError(f"prompt_template={template!r}: name each column, as in '{{text}}'")
            if name not in fields:
                fields.append(name)
    if not fields:
        raise ValueError(f"prompt_template={template!r} uses no column; add one such as '{{text}}'")
    return fields
