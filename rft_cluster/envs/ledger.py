"""The ledger environment: the smallest real agent task. A seeded table of accounts, a tool
server with one tool (`lookup`) speaking OpenAI's function_call protocol, an endpoint grader,
and OpenAI-format datasets asking for one account's balance.

The same seed gives the same table, so datasets written earlier match a server started later.
Every route requires `Authorization: Bearer <token>`, so header forwarding is exercised too.
"""

from __future__ import annotations

import hmac
import json
import random
import re
import secrets
from collections import defaultdict
from pathlib import Path
from types import TracebackType
from typing import Any

from aiohttp import web

from rft_cluster.config import EndpointGrader, ToolSpec
from rft_cluster.serving import ThreadedServer

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


class LedgerApp:
    """The aiohttp application and its per-trace_id logs of tool calls and grades."""

    def __init__(self, ledger: dict[str, int], token: str):
        self._ledger = ledger
        self._token = token
        self._calls: defaultdict[str, list[dict[str, Any]]] = defaultdict(list)
        self._grades: defaultdict[str, list[dict[str, Any]]] = defaultdict(list)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        app.router.add_post("/tool", self._tool)
        app.router.add_post("/grade", self._grade)
        app.router.add_get("/calls/{trace_id}", self._trace_log)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self._token}".encode()):
            return web.Response(status=401, text="missing or wrong bearer token")
        return await handler(request)

    async def _tool(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        if body is None:
            return web.Response(status=400, text="body must be a JSON object (a function_call)")
        status, output = self._lookup(body.get("name"), body.get("arguments"))
        self._calls[str(body.get("trace_id"))].append(
            {"id": body.get("id"), "call_id": body.get("call_id"), "name": body.get("name"),
             "arguments": body.get("arguments"), "status": status}
        )
        if status != 200:
            return web.Response(status=status, text=output)
        return web.json_response(
            {"type": "function_call_output", "call_id": body.get("call_id"), "id": body.get("id"), "output": output}
        )

    def _lookup(self, name: Any, arguments: Any) -> tuple[int, str]:
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
        if account not in self._ledger:
            return 404, f"account {account} not found"
        return 200, lookup_output(account, self._ledger[account])

    async def _grade(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        sample = body.get("sample") if body else None
        item = body.get("item") if body else None
        if not (isinstance(sample, dict) and isinstance(item, dict) and isinstance(sample.get("output_text"), str)
                and isinstance(item.get("answer"), (int, float))):
            return web.Response(status=400, text="need sample.output_text (string) and item.answer (number)")
        given = last_number(sample["output_text"])
        score = 1.0 if given is not None and given == float(item["answer"]) else 0.0
        self._grades[str(body.get("trace_id"))].append({"score": score, "answer": item["answer"], "given": given})
        return web.json_response({"score": score})

    def trace_log(self, trace_id: str) -> dict[str, Any]:
        """A copy of what the server saw for trace_id: its tool calls and its grades."""
        return json.loads(json.dumps({"tool_calls": self._calls.get(trace_id, []), "grades": self._grades.get(trace_id, [])}))

    async def _trace_log(self, request: web.Request) -> web.Response:
        return web.json_response(self.trace_log(request.match_info["trace_id"]))


async def _json_object(request: web.Request) -> dict[str, Any] | None:
    try:
        body = await request.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


class LedgerServers:
    """Runs the ledger app on 127.0.0.1 (a free port) in a background thread, so a synchronous
    driver can use it: `with LedgerServers(seed) as env: ...`."""

    def __init__(self, seed: int = 0, token: str | None = None):
        self.ledger = make_ledger(seed)
        self.token = token or secrets.token_urlsafe(16)
        self._app = LedgerApp(self.ledger, self.token)
        self._server = ThreadedServer(self._app.app())

    @property
    def base_url(self) -> str:
        return self._server.url

    @property
    def tool_url(self) -> str:
        return f"{self.base_url}/tool"

    @property
    def grader_url(self) -> str:
        return f"{self.base_url}/grade"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def tool_specs(self) -> list[ToolSpec]:
        return [ToolSpec(name=TOOL_NAME, server_url=self.tool_url, headers=self.headers)]

    def grader_spec(self) -> EndpointGrader:
        return EndpointGrader(type="endpoint", name="ledger", url=self.grader_url, headers=self.headers)

    def calls(self, trace_id: str) -> list[dict[str, Any]]:
        """Tool calls the server saw for trace_id (id, call_id, name, arguments, HTTP status)."""
        return self._trace_log(trace_id)["tool_calls"]

    def grades(self, trace_id: str) -> list[dict[str, Any]]:
        """Grades the server gave for trace_id (score, answer, number read from the output)."""
        return self._trace_log(trace_id)["grades"]

    def _trace_log(self, trace_id: str) -> dict[str, Any]:
        async def read() -> dict[str, Any]:  # on the server's loop: no cross-thread access to the logs
            return self._app.trace_log(trace_id)

        return self._server.run(read(), timeout=10)

    def __enter__(self) -> LedgerServers:
        self._server.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._server.__exit__(exc_type, exc, tb)
