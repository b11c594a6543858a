"""Questions over the catalogue, the train/validation datasets, and the scripted warm-start
demonstrations.

Each product yields one question (its stock at one warehouse, picked by the seed), so the three
splits — validation, train, and the pool the demonstrations draw from — never share a product.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rft_cluster.envs.warehouse.catalog import WAREHOUSES, Product
from rft_cluster.envs.warehouse.tools import TOOLS, WarehouseTools

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


@dataclass(frozen=True)
class Splits:
    train: list[Question]
    valid: list[Question]
    demo: list[Question]  # every remaining product: the demonstrations' pool


def split_questions(catalog: list[Product], seed: int, n_train: int = 200, n_valid: int = 48) -> Splits:
    """One question per product, shuffled by the seed: validation first, then train, then the rest."""
    if n_train + n_valid > len(catalog):
        raise ValueError(f"n_train + n_valid must be at most {len(catalog)} (one question per product)")
    rng = random.Random(f"warehouse-questions-{seed}")
    questions = [Question(p, rng.choice(WAREHOUSES)) for p in catalog]
    rng.shuffle(questions)
    return Splits(train=questions[n_valid : n_valid + n_train], valid=questions[:n_valid], demo=questions[n_valid + n_train :])


def write_datasets(out_dir: str | Path, splits: Splits) -> tuple[Path, Path]:
    """Writes train.jsonl and valid.jsonl into out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "train.jsonl", out / "valid.jsonl"
    for path, questions in zip(paths, (splits.train, splits.valid)):
        path.write_text("".join(json.dumps(q.row()) + "\n" for q in questions))
    return paths


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
    calls: list[tuple[str, dict[str, Any]]] = [("find_product", {"name": p.name})] * (1 + _streak(rng, MAX_REPEAT_SEARCHES))
    if _streak(rng, 1):
        calls.append(("warehouses", {}))
    look_alikes = [m.sku for m in tools.matches(p.name) if m.sku != p.sku]
    calls += [("stock", {"sku": sku}) for sku in look_alikes[: _streak(rng, MAX_WRONG_STOCKS)]]
    calls += [("stock", {"sku": p.sku})] * (1 + _streak(rng, 1))
    return calls


def _streak(rng: random.Random, n: int) -> int:
    """How many of up to n waste steps in a row are taken: each with probability P_WASTE, until one is not."""
    taken = 0
    while taken < n and rng.random() < P_WASTE:
        taken += 1
    return taken


def demonstration(question: Question, tools: WarehouseTools, rng: random.Random) -> dict[str, Any]:
    """One OpenAI-format conversation: a tool call per assistant turn, each followed by the tool's
    real output (`WarehouseTools.call`, as the server answers), then the answer."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question.text}]
    for n, (name, args) in enumerate(demonstration_calls(question, tools, rng)):
        arguments = json.dumps(args)
        call = {"id": f"call_{n}", "type": "function", "function": {"name": name, "arguments": arguments}}
        messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        messages.append({"role": "tool", "tool_call_id": call["id"], "content": tools.call(name, arguments)})
    messages.append({"role": "assistant", "content": answer(question)})
    return {"messages": messages, "tools": TOOLS}


def write_demonstrations(path: str | Path, tools: WarehouseTools, questions: list[Question], seed: int) -> Path:
    """Writes one demonstration per question (use `Splits.demo`) as JSONL for `rft-cluster sft`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"warehouse-demonstrations-{seed}")
    path.write_text("".join(json.dumps(demonstration(q, tools, rng)) + "\n" for q in questions))
    return path
