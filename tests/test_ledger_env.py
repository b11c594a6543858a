"""The embedded ledger environment: its tool server, grader endpoint and datasets."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from rft_cluster.envs.ledger import N_ACCOUNTS, LedgerServers, last_number, make_ledger, write_datasets
from tests.endpoint_client import function_call, post

SEED = 7


@pytest.fixture(scope="module")
def env() -> Iterator[LedgerServers]:
    with LedgerServers(seed=SEED) as servers:
        yield servers


@pytest_asyncio.fixture(loop_scope="function")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "token"}])
async def test_every_route_requires_the_bearer_token(
    env: LedgerServers, http: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    assert (await post(http, env.tool_url, function_call("lookup", {"account": "ACC-0001"}), headers))[0] == 401
    assert (await post(http, env.grader_url, {}, headers))[0] == 401
    async with http.get(f"{env.base_url}/calls/trace_env", headers=headers) as resp:
        assert resp.status == 401


async def test_lookup_returns_the_balance_and_logs_the_call(env: LedgerServers, http: aiohttp.ClientSession) -> None:
    account, balance = list(env.ledger.items())[10]
    status, text = await post(http, env.tool_url, function_call("lookup", {"account": account.lower()}, "trace_lookup"), env.headers)
    assert status == 200
    assert json.loads(text) == {
        "type": "function_call_output", "call_id": "call_1", "id": "fc_1", "output": f"{account} balance: {balance}"
    }
    [call] = env.calls("trace_lookup")
    assert (call["call_id"], call["name"], call["status"]) == ("call_1", "lookup", 200)
    assert env.calls("trace_never_seen") == []


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (function_call("lookup", {"account": "ACC-XXXX"}), 404, "account ACC-XXXX not found"),
        (function_call("lookup", "not json"), 400, "arguments must be"),
        (function_call("lookup", {"acct": "ACC-0001"}), 400, "arguments must be"),
        (function_call("lookup", ["ACC-0001"]), 400, "arguments must be"),
        (function_call("search", {"account": "ACC-0001"}), 400, "unknown tool 'search'"),
        ("just a string", 400, "JSON object"),
    ],
)
async def test_lookup_errors(
    env: LedgerServers, http: aiohttp.ClientSession, body: Any, status: int, message: str
) -> None:
    got_status, text = await post(http, env.tool_url, body, env.headers)
    assert got_status == status and message in text


@pytest.mark.parametrize(
    ("output_text", "score"),
    [
        ("The balance is 4521.", 1.0),
        ("ACC-0137 has 4,521", 1.0),
        ("4521.00", 1.0),
        ("It is 4521, not 4520", 0.0),
        ("I don't know", 0.0),
    ],
)
async def test_grader_scores_the_last_number(
    env: LedgerServers, http: aiohttp.ClientSession, output_text: str, score: float
) -> None:
    body = {"sample": {"output_text": output_text}, "item": {"account": "ACC-0137", "answer": 4521}, "trace_id": "trace_g"}
    status, text = await post(http, env.grader_url, body, env.headers)
    assert status == 200 and json.loads(text) == {"score": score}
    assert env.grades("trace_g")[-1]["score"] == score


async def test_grader_rejects_bodies_it_cannot_score(env: LedgerServers, http: aiohttp.ClientSession) -> None:
    body = {"sample": {"output_text": "4521"}, "item": {"account": "ACC-0137"}, "trace_id": "trace_bad"}
    assert (await post(http, env.grader_url, body, env.headers))[0] == 400
    assert env.grades("trace_bad") == []


def test_last_number() -> None:
    assert last_number("from -12 to 1,234,567.5 then 8") == 8.0
    assert last_number("from -12 to 1,234,567.5") == 1234567.5
    assert last_number("ACC-0137") == 137.0
    assert last_number("a loss of -300") == -300.0
    assert last_number("none") is None


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_datasets_are_well_formed(tmp_path: Path) -> None:
    train_path, valid_path = write_datasets(tmp_path, seed=SEED)
    train, valid = read_rows(train_path), read_rows(valid_path)
    ledger = make_ledger(SEED)
    assert (len(train), len(valid)) == (48, 16)
    assert not {r["account"] for r in train} & {r["account"] for r in valid}
    for row in train + valid:
        assert set(row) == {"messages", "tools", "account", "answer"}
        assert row["messages"][-1]["role"] == "user" and row["account"] in row["messages"][-1]["content"]
        assert row["answer"] == ledger[row["account"]]
        [tool] = row["tools"]
        assert tool["type"] == "function" and tool["function"]["name"] == "lookup"
        assert tool["function"]["parameters"]["required"] == ["account"]


def test_datasets_and_table_are_deterministic_per_seed(tmp_path: Path) -> None:
    first = [p.read_bytes() for p in write_datasets(tmp_path / "a", seed=SEED)]
    again = [p.read_bytes() for p in write_datasets(tmp_path / "b", seed=SEED)]
    other = [p.read_bytes() for p in write_datasets(tmp_path / "c", seed=SEED + 1)]
    assert first == again and first != other
    assert make_ledger(SEED) == make_ledger(SEED) != make_ledger(SEED + 1)
    assert len(make_ledger(SEED)) == N_ACCOUNTS
    with pytest.raises(ValueError):
        write_datasets(tmp_path / "d", seed=SEED, n_train=N_ACCOUNTS, n_valid=1)


async def test_server_answers_match_dataset_answers(
    env: LedgerServers, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    _, valid_path = write_datasets(tmp_path, seed=SEED)
    for row in read_rows(valid_path)[:3]:
        status, text = await post(http, env.tool_url, function_call("lookup", {"account": row["account"]}), env.headers)
        assert status == 200 and json.loads(text)["output"].endswith(f"balance: {row['answer']}")
