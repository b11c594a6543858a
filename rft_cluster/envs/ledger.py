"""The ledger environment: the smallest real agent task. A seeded table of accounts, a tool
server with one tool (`lookup`) speaking OpenAI's function_call protocol, an endpoint grader,
and OpenAI-format datasets asking for one account's balance.

The same seed gives the same table, so datasets written earlier match a server started later.
Every route requires `Authorization: Bearer <token>`, so header forwarding is exercised too.
"""

from __future__ import annotations

import functools
import json
import random
import re
from pathlib import Path
from typing import Any

from rft_cluster.envs.endpoints import EnvServers

N_ACCOUNTS = 64
TOOL_NAME = "lookup"
SYSTEM_PROMPT = "You are a bookkeeping assistant. Read balances with the lookup tool; never guess them."
LOOKUP_TOOL = {
    "type": "function",
    "function": {
        "name": TOOL_NAME,
        "description": "Look up the current balance of one account.",
        "parameters": {
            "type": "object",
            "properties": {"account": {"type": "string", "description": "account id, e.g. ACC-0137"}},
            "required": ["account"],
            "additionalProperties": False,
        },
    },
}
_BAD_ARGUMENTS = 'arguments must be a JSON object like {"account": "ACC-0137"}'
# A minus sign counts only where it cannot be a hyphen: "ACC-0137" reads as 137, not -137.
_NUMBER = re.compile(r"(?<!\w)-?\d+(?:,\d{3})*(?:\.\d+)?")


def make_ledger(seed: int) -> dict[str, int]:
    """account id → balance. Insertion order is random too (used to split datasets)."""
    rng = random.Random(seed)
    return {f"ACC-{n:04d}": rng.randint(100, 99_999) for n in rng.sample(range(10_000), N_ACCOUNTS)}


def question(account: str) -> str:
    return f"What is the balance of account {account}? Use the lookup tool, then answer with the number."


def write_datasets(out_dir: str | Path, seed: int, n_train: int = 48, n_valid: int = 16) -> tuple[Path, Path]:
    """Writes train.jsonl and valid.jsonl (disjoint accounts) into out_dir; returns their paths."""
    accounts = list(make_ledger(seed).items())
    if n_train + n_valid > len(accounts):
        raise ValueError(f"n_train + n_valid must be at most {len(accounts)} (one row per account)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "train.jsonl", out / "valid.jsonl"
    for path, rows in zip(paths, (accounts[:n_train], accounts[n_train : n_train + n_valid])):
        with path.open("w") as f:
            for account, balance in rows:
                row = {
                    "messages": [
                        {"role": "system", "content": SYSTEM_PROMPT},
                        {"role": "user", "content": question(account)},
                    ],
                    "tools": [LOOKUP_TOOL],
                    "account": account,
                    "answer": balance,
                }
                f.write(json.dumps(row) + "\n")
    return paths


def lookup_output(account: str, balance: int) -> str:
    """The lookup tool's answer text (the server's and the demonstrations' — one format)."""
    return f"{account} balance: {balance}"


def write_demonstrations(path: str | Path, seed: int, n: int = 256) -> Path:
    """Scripted solutions (one lookup, then the answer) as OpenAI-format conversations for
    `rft-cluster sft`: a warm start, so rewards are not all 0. The accounts are made up (not
    the served ledger's), so the policy learns the procedure, not the answers."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"demonstrations-{seed}")
    with path.open("w") as f:
        for _ in range(n):
            account, balance = f"ACC-{rng.randrange(10_000):04d}", rng.randint(100, 99_999)
            call = {"id": "call_0", "type": "function", "function": {"name": TOOL_NAME, "arguments": json.dumps({"account": account})}}
            messages = [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": question(account)},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_0", "content": lookup_output(account, balance)},
                {"role": "assistant", "content": f"The balance of {account} is {balance}."},
            ]
            f.write(json.dumps({"messages": messages, "tools": [LOOKUP_TOOL]}) + "\n")
    return path


def last_number(text: str) -> float | None:
    """The last number in text ("4,521" and "4521.00" both read as 4521.0), or None."""
    numbers = _NUMBER.findall(text)
    return float(numbers[-1].replace(",", "")) if numbers else None


def _lookup(ledger: dict[str, int], name: Any, arguments: Any) -> tuple[int, str]:
    """(HTTP status, text) for one call."""
    if name != TOOL_NAME:
        return 400, f"unknown tool {name!r}; this server serves {TOOL_NAME!r}"
    try:
        args = json.loads(arguments)
    except (TypeError, ValueError):
        return 400, _BAD_ARGUMENTS
    account = args.get("account") if isinstance(args, dict) else None
    if not isinstance(account, str):
        return 400, _BAD_ARGUMENTS
    account = account.strip().upper()
    if account not in ledger:
        return 404, f"account {account} not found"
    return 200, lookup_output(account, ledger[account])


def _grade(output_text: str, answer: float) -> tuple[float, float | None]:
    """(1.0 if the last number in the output is the answer else 0.0, the number read)."""
    given = last_number(output_text)
    return (1.0 if given is not None and given == float(answer) else 0.0), given


class LedgerServers(EnvServers):
    """Runs the ledger's tool server and grader on 127.0.0.1 (a free port) in a background
    thread, so a synchronous driver can use it: `with LedgerServers(seed) as env: ...`."""

    def __init__(self, seed: int = 0, token: str | None = None):
        self.ledger = make_ledger(seed)
        super().__init__(functools.partial(_lookup, self.ledger), _grade, (TOOL_NAME,), "ledger", token)
