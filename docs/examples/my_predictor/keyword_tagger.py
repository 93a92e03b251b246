"""A predictor of one's own: tags texts with the topics of a keyword lexicon.

It lives in a module the replicas import; ``docs/examples/custom_predictor.py`` ships this
directory to them with ``runtime_env={"working_dir": ...}``. See docs/predictors.md.
"""

from __future__ import annotations

import json
import os

import pandas as pd

from airflow_batch_provider.core.errors import RowsFailed


class KeywordTagger:
    """``batch_format="pandas"``: a DataFrame in, a DataFrame out.

    :param lexicon: a JSON file ``{topic: [keyword, ...]}`` (the "model"), read once per replica.
    :param min_hits: rows with fewer keyword hits are left out of the output (a filter).
    :param max_chars: longer texts fail, each on its own row (``RowsFailed``).
    :param model_version: changes nothing here; bump it when the code's output changes, so the
        job's fingerprint changes and committed shards are not reused.
    """

    def __init__(self, lexicon: str, min_hits: int = 1, max_chars: int = 200, model_version: int = 1):
        # Runs once per replica, before its first batch: load the model here, never in __call__.
        with open(lexicon) as handle:
            self.topics = {topic: [w.lower() for w in words] for topic, words in json.load(handle).items()}
        self.min_hits = min_hits
        self.max_chars = max_chars
        self.loaded_by = os.getpid()

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        # One call at a time per replica: state kept on self needs no lock.
        failed = {}
        tags, hits = [], []
        for position, text in enumerate(batch["text"]):
            if pd.isna(text):  # a null text (NaN in a pandas str column): null tags, never the tags of "nan"
                tags.append(None)
                hits.append(None)
                continue
            if len(text) > self.max_chars:
                failed[position] = f"text of {len(text)} characters; at most max_chars={self.max_chars}"
                tags.append(None)
                hits.append(None)
                continue
            words = text.lower().split()
            found = {topic: sum(words.count(k) for k in keywords) for topic, keywords in self.topics.items()}
            tags.append(sorted(t for t, n in found.items() if n))  # a list per row, of any length
            hits.append(sum(found.values()))
        out = pd.DataFrame({"id": batch["id"], "tags": tags, "hits": pd.array(hits, dtype="Int64")})
        keep = [i not in failed and (h is None or h >= self.min_hits) for i, h in enumerate(hits)]
        output = out[keep].reset_index(drop=True)  # null texts stay (their row, with nulls)
        if failed:
            raise RowsFailed(failed, output=output)  # the other rows' output, as it is
        return output
