"""Questions over the catalogue, the train/validation datasets, and the scripted warm-start
demonstrations.

Each product yields one question (its stock at one warehouse, picked by the seed), so the three
splits — validation, train, and the pool the demonstrations draw from — never share a product.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rft_cluster.envs import scripted
from rft_cluster.envs.scripted import Splits, write_datasets
from rft_cluster.envs.warehouse.catalog import WAREHOUSES, Product
from rft_cluster.envs.warehouse.tools import TOOLS, WarehouseTools

__all__ = ["SYSTEM_PROMPT", "Question", "Splits", "split_questions", "write_datasets", "write_demonstrations"]

SYSTEM_PROMPT = "You are a warehouse helpdesk. Find the product's SKU, read its stock, then reply with the number of units."

# Waste in a demonstration, around the one `find_product` and the one right `stock` that solve
# the task, in this order: repeats of the search, a `warehouses` listing, the stock of look-alike
# products read first, and the right stock read again. Each next waste step is taken with
# probability 0.6 (as an agent's next turn would be), so the warm-started policy samples the
# cheaper choice too: 2 + 0.96 + 0.6 + 0.96 + 0.6 = 5.1 calls on average, from 2 to 8.
P_WASTE = 0.6
MAX_REPEAT_SEARCHES = 2
MAX_WRONG_STOCKS = 2


@dataclass(frozen=True)
class Question:
    product: Product
    warehouse: str

    @property
    def answer(self) -> int:
        return self.product.stock[self.warehouse]

    @property
    def text(self) -> str:
        return f"How many units of {self.product.name} are in stock at {self.warehouse}?"

    def row(self) -> dict[str, Any]:
        """The dataset row: prompt, tool schemas, and the reference fields tools and graders see."""
        return {
            "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": self.text}],
            "tools": TOOLS,
            "answer": self.answer,
            "sku": self.product.sku,
            "product": self.product.name,
            "warehouse": self.warehouse,
        }


def split_questions(catalog: list[Product], seed: int, n_train: int = 200, n_valid: int = 48) -> Splits[Question]:
    """One question per product, shuffled by the seed: validation first, then train, then the rest."""
    rng = random.Random(f"warehouse-questions-{seed}")
    questions = [Question(p, rng.choice(WAREHOUSES)) for p in catalog]
    return scripted.split(questions, rng, n_train, n_valid, "product")


def answer(question: Question) -> str:
    """A demonstration's reply: the question restated up to its warehouse, then the units ("How
    many units of Compact Steel Hinge are in stock at Denver: 41"). Every word is a verbatim copy
    from the context, each anchored by the words before it: a reply that opened with the product's
    name ("Compact Steel Hinge at Denver: 41") gave a copying model no anchor for its first word,
    and the warm start named look-alikes and other warehouses (baseline 0.00 in the pre-check)."""
    return f"{question.text.rstrip('?')}: {question.answer}"


def demonstration_calls(question: Question, tools: WarehouseTools, rng: random.Random) -> list[tuple[str, dict[str, Any]]]:
    """(tool name, arguments) of one wasteful but successful trajectory, in order."""
    p = question.product
    calls: list[tuple[str, dict[str, Any]]] = [("find_product", {"name": p.name})] * (1 + scripted.streak(rng, P_WASTE, MAX_REPEAT_SEARCHES))
    if scripted.streak(rng, P_WASTE, 1):
        calls.append(("warehouses", {}))
    look_alikes = [m.sku for m in tools.matches(p.name) if m.sku != p.sku]
    calls += [("stock", {"sku": sku}) for sku in look_alikes[: scripted.streak(rng, P_WASTE, MAX_WRONG_STOCKS)]]
    calls += [("stock", {"sku": p.sku})] * (1 + scripted.streak(rng, P_WASTE, 1))
    return calls


def demonstration(question: Question, tools: WarehouseTools, rng: random.Random) -> dict[str, Any]:
    """One OpenAI-format conversation: the wasteful calls with the tools' real outputs
    (`WarehouseTools.call`, as the server answers), then the answer."""
    return scripted.demonstration(SYSTEM_PROMPT, question.text, demonstration_calls(question, tools, rng), tools.call, answer(question), TOOLS)


def write_demonstrations(path: str | Path, tools: WarehouseTools, questions: list[Question], seed: int) -> Path:
    """Writes one demonstration per question (use `Splits.demo`) as JSONL for `rft-cluster sft`."""
    rng = random.Random(f"warehouse-demonstrations-{seed}")
    return scripted.write_jsonl(path, (demonstration(q, tools, rng) for q in questions))
