"""The warehouse environment: its tool server, grader endpoint, datasets and demonstrations."""

from __future__ import annotations

import json
import statistics
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from rft_cluster.envs.warehouse import (
    WAREHOUSES,
    WarehouseServers,
    make_catalog,
    score,
    split_questions,
    write_datasets,
    write_demonstrations,
)
from tests.endpoint_client import function_call, post

SEED = 3


@pytest.fixture(scope="module")
def env() -> Iterator[WarehouseServers]:
    with WarehouseServers(SEED) as servers:
        yield servers


@pytest_asyncio.fixture(loop_scope="function")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_a_question_is_answered_by_two_lookups_combined(env: WarehouseServers, http: aiohttp.ClientSession) -> None:
    """find_product gives the SKU among look-alikes; stock lists every warehouse, one line asked for."""
    product = make_catalog(SEED)[5]
    status, body = await post(http, env.tool_url, function_call("find_product", {"name": product.name}, "t1"), env.headers)
    lines = json.loads(body)["output"].splitlines()
    assert status == 200 and lines[0] == f"{product.sku} {product.name}" and len(lines) == 3
    assert all(set(line.split()[1:]) & set(product.name.split()) for line in lines[1:])  # look-alikes share words
    status, body = await post(http, env.tool_url, function_call("stock", {"sku": product.sku}, "t1"), env.headers)
    stock = json.loads(body)["output"].splitlines()
    assert status == 200 and stock[1:] == [f"{w}: {product.stock[w]}" for w in WAREHOUSES]
    assert [c["name"] for c in env.calls("t1")] == ["find_product", "stock"]


@pytest.mark.parametrize(("name", "arguments", "status"), [
    ("stock", {"sku": "SKU-1"}, 404),
    ("stock", {}, 400),
    ("find_product", {"name": "zzz"}, 404),
    ("delete", {}, 400),
])
async def test_refused_calls_answer_4xx_with_a_reason(env: WarehouseServers, http: aiohttp.ClientSession, name: str,
                                                      arguments: dict, status: int) -> None:
    got, text = await post(http, env.tool_url, function_call(name, arguments, "t2"), env.headers)
    assert got == status and text


async def test_every_route_requires_the_bearer_token(env: WarehouseServers, http: aiohttp.ClientSession) -> None:
    assert (await post(http, env.tool_url, function_call("warehouses", {}, "t3"), {}))[0] == 401
    assert (await post(http, env.grader_url, {}, {"Authorization": "Bearer wrong"}))[0] == 401


async def test_grader_scores_the_last_integer_exactly(env: WarehouseServers, http: aiohttp.ClientSession) -> None:
    async def grade(text: str, answer: int) -> float:
        status, body = await post(http, env.grader_url, {"sample": {"output_text": text}, "item": {"answer": answer}, "trace_id": "g"}, env.headers)
        assert status == 200
        return json.loads(body)["score"]

    assert await grade("Compact Steel Hinge at Denver: 41", 41) == 1.0
    assert await grade("SKU-40213 has 41 at Reno: 17", 41) == 0.0  # the last number is the answer
    assert await grade("41.5", 41) == 0.0
    assert await grade("SKU-41", 41) == 0.0  # an id's digits are not units


def test_grading_reads_integers_not_id_digits() -> None:
    assert score("at Boise: 7", 7) == (1.0, 7.0)
    assert score("no number", 7) == (0.0, None)
    assert score("SKU-00007", 7) == (0.0, None)


def test_datasets_and_demonstrations_are_deterministic_disjoint_and_wasteful(env: WarehouseServers, tmp_path: Path) -> None:
    """Same seed, same files; splits share no product; demonstrations average ~5 calls, solve the
    task, and carry the outputs the server gives."""
    catalog = make_catalog(SEED)
    splits = split_questions(catalog, SEED)
    assert not {q.product.sku for q in splits.valid} & {q.product.sku for q in splits.train + splits.demo}
    for out in (tmp_path / "a", tmp_path / "b"):
        write_datasets(out, split_questions(make_catalog(SEED), SEED))
        write_demonstrations(out / "sft.jsonl", env.tools, splits.demo[:120], SEED)
    assert all((tmp_path / "a" / f).read_text() == (tmp_path / "b" / f).read_text() for f in ("train.jsonl", "valid.jsonl", "sft.jsonl"))
    rows = [json.loads(line) for line in (tmp_path / "a" / "sft.jsonl").read_text().splitlines()]
    calls = [[m["tool_calls"][0]["function"] for m in r["messages"] if m.get("tool_calls")] for r in rows]
    assert 4.5 <= statistics.mean(len(c) for c in calls) <= 5.7 and min(len(c) for c in calls) == 2
    for row, question, row_calls in zip(rows, splits.demo, calls):
        assert row["messages"][-1]["content"].endswith(f": {question.answer}")
        assert row_calls[-1] == {"name": "stock", "arguments": json.dumps({"sku": question.product.sku})}
        outputs = [m["content"] for m in row["messages"] if m["role"] == "tool"]
        assert outputs == [env.tools.call(c["name"], c["arguments"]) for c in row_calls]
    train = [json.loads(line) for line in (tmp_path / "a" / "train.jsonl").read_text().splitlines()]
    assert len(train) == 200 and all(isinstance(r["answer"], int) and r["warehouse"] in WAREHOUSES for r in train)
