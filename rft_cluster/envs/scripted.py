"""What the embedded environments' task modules share: one question per record, split three ways
(validation, train, and the pool the demonstrations draw from, so the warm start never sees an
evaluated record); the datasets as OpenAI-format JSONL; and scripted demonstrations whose tool
outputs are the tools' real answers."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar


class Task(Protocol):
    def row(self) -> dict[str, Any]: ...


Q = TypeVar("Q", bound=Task)


@dataclass(frozen=True)
class Splits(Generic[Q]):
    train: list[Q]
    valid: list[Q]
    demo: list[Q]  # every remaining question: the demonstrations' pool


def split(questions: list[Q], rng: random.Random, n_train: int, n_valid: int, unit: str) -> Splits[Q]:
    """Shuffles the questions (one per `unit`) with rng: validation first, then train, then the rest."""
    if n_train + n_valid > len(questions):
        raise ValueError(f"n_train + n_valid must be at most {len(questions)} (one question per {unit})")
    rng.shuffle(questions)
    return Splits(train=questions[n_valid : n_valid + n_train], valid=questions[:n_valid], demo=questions[n_valid + n_train :])


def write_datasets(out_dir: str | Path, splits: Splits[Any]) -> tuple[Path, Path]:
    """Writes train.jsonl and valid.jsonl into out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "train.jsonl", out / "valid.jsonl"
    for path, questions in zip(paths, (splits.train, splits.valid)):
        write_jsonl(path, (q.row() for q in questions))
    return paths


def streak(rng: random.Random, p: float, n: int) -> int:
    """How many of up to n waste steps in a row are taken: each with probability p, until one is not."""
    taken = 0
    while taken < n and rng.random() < p:
        taken += 1
    return taken


def demonstration(
    system_prompt: str,
    question: str,
    calls: list[tuple[str, dict[str, Any]]],
    call_tool: Callable[[str, str], str],
    reply: str,
    tools: list[dict[str, Any]],
) -> dict[str, Any]:
    """One OpenAI-format conversation: a tool call per assistant turn, each followed by
    `call_tool`'s output (the function the server calls, so it is what the server would answer),
    then the reply."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": system_prompt}, {"role": "user", "content": question}]
    for n, (name, args) in enumerate(calls):
        arguments = json.dumps(args)
        call = {"id": f"call_{n}", "type": "function", "function": {"name": name, "arguments": arguments}}
        messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        messages.append({"role": "tool", "tool_call_id": call["id"], "content": call_tool(name, arguments)})
    messages.append({"role": "assistant", "content": reply})
    return {"messages": messages, "tools": tools}


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
