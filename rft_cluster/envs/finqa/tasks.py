"""Questions over the corpus, the train/validation datasets, and the scripted warm-start
demonstrations.

Each report yields one question (about one of its line items, picked by the seed), so the three
splits — validation, train, and the pool the demonstrations draw from — never share a report:
the warm start teaches the procedure, not answers the evaluation asks for.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rft_cluster.envs import scripted
from rft_cluster.envs.finqa.corpus import METRIC_LABELS, METRICS, Report
from rft_cluster.envs.finqa.tools import TOOLS, FinQATools
from rft_cluster.envs.scripted import Splits, write_datasets

__all__ = ["SYSTEM_PROMPT", "Question", "Splits", "split_questions", "write_datasets", "write_demonstrations"]

SYSTEM_PROMPT = "Answer from the company reports: find the right report with the tools, read it, then reply with the number."

# Waste in a demonstration, around the one search and the one right `cat` that solve the task,
# in this order: repeats of the search, a `list` of the company's directory, one of the year's,
# wrong reports `cat`-ed before the right one, and the right one read again. At each point the
# next waste step is taken with probability 0.6, as an agent's next turn would be: no choice is
# near-certain, so the warm-started policy samples each both ways and RL can select the cheaper
# one turn by turn (with the search repeated and each directory listed at 0.9, RL runs kept all
# three). The mean is 2 + 0.96 + 1.2 + 1.18 + 0.6 = 5.9 calls, from 2 to 10: inside a 10-call
# budget. (Listing the root is left out: its 70 lines would be a quarter of a demonstration's
# tokens.)
P_WASTE = 0.6
MAX_REPEAT_SEARCHES = 2
MAX_WRONG_CATS = 3


@dataclass(frozen=True)
class Question:
    report: Report
    metric: str  # a key of corpus.METRICS

    @property
    def answer(self) -> float | int:
        return self.report.values[self.metric]

    @property
    def text(self) -> str:
        r = self.report
        label = METRIC_LABELS[self.metric].lower()
        verb = "were" if label.endswith("s") else "was"  # "operating expenses" is plural
        unit = "" if self.metric == "headcount" else ", in USD millions"
        return f"What {verb} the {label} of {r.company} in Q{r.quarter} {r.year}{unit}?"

    def row(self) -> dict[str, Any]:
        """The dataset row: prompt, tool schemas, and the reference fields tools and graders see."""
        r = self.report
        return {
            "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": self.text}],
            "tools": TOOLS,
            "answer": self.answer,
            "path": r.path,
            "company": r.company,
            "year": r.year,
            "quarter": r.quarter,
            "metric": self.metric,
        }


def split_questions(reports: list[Report], seed: int, n_train: int = 256, n_valid: int = 64) -> Splits[Question]:
    """One question per report, shuffled by the seed: validation first, then train, then the rest."""
    rng = random.Random(f"finqa-questions-{seed}")
    questions = [Question(report, rng.choice(METRICS)[0]) for report in reports]
    return scripted.split(questions, rng, n_train, n_valid, "report")


def search_query(question: Question) -> str:
    """The query a demonstration searches with: the question up to its period ("What was the net
    income of Acme Foods in Q3 2019"), a span a small model copies verbatim."""
    return question.text.split(",")[0].rstrip("?")


def answer(question: Question) -> str:
    """A demonstration's reply: the question up to its line item, then the report's number
    ("What was the net income: 31.8"). Both halves are verbatim copies a small model can make:
    the words from the question, the number from the report line that ends in the same words."""
    label = METRIC_LABELS[question.metric].lower()
    return f"{question.text.split(label)[0]}{label}: {question.answer}"


def demonstration_calls(question: Question, tools: FinQATools, rng: random.Random) -> list[tuple[str, dict[str, Any]]]:
    """(tool name, arguments) of one wasteful but successful trajectory, in order."""
    r = question.report
    search = ("search", {"query": search_query(question)})
    calls: list[tuple[str, dict[str, Any]]] = [search] * (1 + scripted.streak(rng, P_WASTE, MAX_REPEAT_SEARCHES))
    if scripted.streak(rng, P_WASTE, 1):
        calls.append(("list", {"path": r.slug}))
    if scripted.streak(rng, P_WASTE, 1):
        calls.append(("list", {"path": f"{r.slug}/{r.year}"}))
    calls += [("cat", {"path": path}) for path in _wrong_reports(question, tools, scripted.streak(rng, P_WASTE, MAX_WRONG_CATS))]
    calls += [("cat", {"path": r.path})] * (1 + scripted.streak(rng, P_WASTE, 1))
    return calls


def _wrong_reports(question: Question, tools: FinQATools, n: int) -> list[str]:
    """Reports an agent might open by mistake: the search's other hits first (trusting the
    ranking), then the same company's other quarters of that year."""
    r = question.report
    hits = [tools.paths[i] for i in tools.searcher.top_k(search_query(question), n + 1)]
    neighbours = [f"{r.slug}/{r.year}/Q{q}.txt" for q in (1, 2, 3, 4)]
    candidates = [p for p in dict.fromkeys(hits + neighbours) if p != r.path and p in tools.paths]
    return candidates[:n]


def demonstration(question: Question, tools: FinQATools, rng: random.Random) -> dict[str, Any]:
    """One OpenAI-format conversation: the wasteful calls with the tools' real outputs
    (`FinQATools.call`, as the server answers), then the answer."""
    return scripted.demonstration(SYSTEM_PROMPT, question.text, demonstration_calls(question, tools, rng), tools.call, answer(question), TOOLS)


def write_demonstrations(path: str | Path, tools: FinQATools, questions: list[Question], seed: int) -> Path:
    """Writes one demonstration per question (use `Splits.demo`: reports no dataset asks about)
    as JSONL for `rft-cluster sft`; the waste pattern of each is drawn from the seed."""
    rng = random.Random(f"finqa-demonstrations-{seed}")
    return scripted.write_jsonl(path, (demonstration(q, tools, rng) for q in questions))
