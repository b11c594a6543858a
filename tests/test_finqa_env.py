"""The FinQA environment on a small corpus: generator, tool server (search, list, cat), grader,
datasets and demonstrations."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from rft_cluster.dataset import check_dataset
from rft_cluster.envs.finqa import (
    TOOLS,
    FinQAServers,
    FinQATools,
    Question,
    generate_reports,
    score,
    split_questions,
    write_corpus,
    write_datasets,
    write_demonstrations,
)
from rft_cluster.envs.finqa.corpus import METRIC_LABELS
from rft_cluster.envs.finqa.grading import last_number
from tests.endpoint_client import function_call, post

SEED = 11
N_COMPANIES = 4  # 160 reports
BACKENDS = ["bm25", "embedding"]  # scripts/setup.sh installs the embedding model: both must work


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small corpus, plus traps: a symlinked file and a symlinked directory leading out of it,
    and a hidden file (as the search cache is)."""
    root = write_corpus(tmp_path_factory.mktemp("finqa") / "corpus", generate_reports(SEED, N_COMPANIES))
    outside = root.parent / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "secret.txt").write_text("SECRET quarterly report, Q1 2019\n")
    (outside / "dir" / "Q1.txt").write_text("SECRET quarterly report, Q2 2019\n")
    (root / "escape.txt").symlink_to(outside / "secret.txt")
    (root / "escape-dir").symlink_to(outside / "dir")
    (root / ".hidden.txt").write_text("SECRET quarterly report, Q3 2019\n")
    return root


@pytest.fixture(scope="module", params=BACKENDS)
def env(request: pytest.FixtureRequest, corpus: Path) -> Iterator[FinQAServers]:
    with FinQAServers(corpus, backend=request.param) as servers:
        yield servers


@pytest_asyncio.fixture(loop_scope="function")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def tool(http: aiohttp.ClientSession, env: FinQAServers, name: str, arguments: Any,
               trace_id: str = "trace_finqa") -> tuple[int, str]:
    """(status, output text on 200 or the error body)."""
    status, text = await post(http, env.tool_url, function_call(name, arguments, trace_id), env.headers)
    return status, json.loads(text)["output"] if status == 200 else text


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- corpus ---------------------------------------------------------------------------------------


def test_corpus_is_deterministic_per_seed(tmp_path: Path) -> None:
    reports = generate_reports(SEED, N_COMPANIES)
    assert reports == generate_reports(SEED, N_COMPANIES) != generate_reports(SEED + 1, N_COMPANIES)
    assert len(reports) == N_COMPANIES * 10 * 4 and len({r.path for r in reports}) == len(reports)
    trees = [write_corpus(tmp_path / name, reports) for name in ("a", "b")]
    files = [{p.relative_to(t).as_posix(): p.read_bytes() for p in t.rglob("*.txt")} for t in trees]
    assert files[0] == files[1] and len(files[0]) == len(reports)
    report = reports[37]
    lines = files[0][report.path].decode().splitlines()
    assert lines[0] == f"{report.company} quarterly report, Q{report.quarter} {report.year}"
    assert f"- net income: {report.values['net_income']}" in lines


def test_full_corpus_has_2800_reports_and_writes_fast(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    reports = generate_reports(0)
    write_corpus(tmp_path, reports)
    assert time.perf_counter() - t0 < 60  # seconds, not minutes (~2 s alone; room for a loaded machine)
    assert len(list(tmp_path.rglob("*.txt"))) == len({r.path for r in reports}) == 2800
    assert len({r.company for r in reports}) == 70


# --- tools ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "status", "message"),
    [
        ("../outside/secret.txt", 403, "outside the corpus root"),
        ("{company}/../../outside/secret.txt", 403, "outside the corpus root"),
        ("{abs}", 403, "absolute paths are refused"),
        ("/etc/passwd", 403, "absolute paths are refused"),
        ("escape.txt", 403, "outside the corpus root"),
        ("escape-dir/Q1.txt", 403, "outside the corpus root"),
        (".hidden.txt", 404, "no such file"),
        ("{company}/2019/Q5.txt", 404, "no such report"),
        ("{company}/2019", 400, "is a directory"),
    ],
)
async def test_cat_refuses_paths_outside_the_root_and_non_reports(
    env: FinQAServers, http: aiohttp.ClientSession, path: str, status: int, message: str
) -> None:
    company = env.tools.paths[0].split("/")[0]
    path = path.format(company=company, abs=env.tools.root / env.tools.paths[0])
    got_status, text = await tool(http, env, "cat", {"path": path})
    assert (got_status, message in text) == (status, True), text
    assert "SECRET" not in text


async def test_cat_reads_a_report(env: FinQAServers, http: aiohttp.ClientSession) -> None:
    path = env.tools.paths[5]
    status, text = await tool(http, env, "cat", {"path": path})
    assert status == 200 and text == (env.tools.root / path).read_text().rstrip("\n")
    assert (await tool(http, env, "cat", {"path": f"./{path}"}))[1] == text


def test_escaping_symlinks_and_hidden_files_are_not_indexed(env: FinQAServers) -> None:
    assert all(not p.startswith(("escape", ".")) for p in env.tools.paths)
    assert len(env.tools.paths) == N_COMPANIES * 40
    assert not any("SECRET" in title for title in env.tools.titles)


async def test_list(env: FinQAServers, http: aiohttp.ClientSession) -> None:
    company = env.tools.paths[0].split("/")[0]
    status, root = await tool(http, env, "list", {"path": ""})
    assert status == 200 and company + "/" in root.splitlines()
    assert not any(line.startswith(".") for line in root.splitlines())  # the search cache is hidden
    assert (await tool(http, env, "list", {"path": "."})) == (200, root)
    assert (await tool(http, env, "list", {"path": company})) == (200, "\n".join(f"{y}/" for y in range(2015, 2025)))
    assert (await tool(http, env, "list", {"path": f"{company}/2019/"})) == (200, "Q1.txt\nQ2.txt\nQ3.txt\nQ4.txt")
    assert (await tool(http, env, "list", {"path": ".."}))[0] == 403
    assert (await tool(http, env, "list", {"path": "escape-dir"}))[0] == 403
    assert (await tool(http, env, "list", {"path": f"{company}/2019/Q1.txt"}))[0] == 400
    assert (await tool(http, env, "list", {"path": "nobody"}))[0] == 404


async def test_search_finds_a_report_by_its_title_first(env: FinQAServers, http: aiohttp.ClientSession) -> None:
    for i in (0, 57, 123):
        path, title = env.tools.paths[i], env.tools.titles[i]
        status, text = await tool(http, env, "search", {"query": title})
        assert status == 200
        hits = text.splitlines()
        assert len(hits) == 3 and hits[0] == f"{path}: {title}"
    status, text = await tool(http, env, "search", {"query": env.tools.titles[0], "k": 7})
    assert status == 200 and len(text.splitlines()) == 7


def test_bm25_ranks_the_asked_report_first_for_a_question_like_query(corpus: Path) -> None:
    tools = FinQATools(corpus, backend="bm25")
    assert tools.searcher.backend == "bm25"
    for report in generate_reports(SEED, N_COMPANIES)[::13]:
        query = f"{report.company} net income Q{report.quarter} {report.year}"
        assert tools.search(query, 1) == f"{report.path}: {report.title}"
    assert tools.search("zzz unknown words", 3) == "no matching reports"


@pytest.mark.parametrize(
    ("name", "arguments", "status", "message"),
    [
        ("search", {"query": ""}, 400, "search needs"),
        ("search", {"query": "x", "k": 0}, 400, "k must be"),
        ("search", {"query": "x", "k": "3"}, 400, "k must be"),
        ("cat", {}, 400, "cat needs"),
        ("cat", "not json", 400, "JSON object"),
        ("cat", ["a"], 400, "JSON object"),
        ("grep", {"path": ""}, 400, "unknown tool 'grep'"),
    ],
)
async def test_malformed_calls_are_4xx(
    env: FinQAServers, http: aiohttp.ClientSession, name: str, arguments: Any, status: int, message: str
) -> None:
    got_status, text = await tool(http, env, name, arguments)
    assert got_status == status and message in text


async def test_calls_are_logged_per_trace(env: FinQAServers, http: aiohttp.ClientSession) -> None:
    await tool(http, env, "list", {"path": ""}, trace_id="trace_log")
    await tool(http, env, "cat", {"path": "../x"}, trace_id="trace_log")
    assert [(c["name"], c["status"]) for c in env.calls("trace_log")] == [("list", 200), ("cat", 403)]
    assert env.calls("trace_never_seen") == []


async def test_a_tool_delay_holds_every_call_at_least_that_long(corpus: Path, http: aiohttp.ClientSession) -> None:
    delay_s = 0.3
    with FinQAServers(corpus, backend="bm25") as plain, FinQAServers(corpus, backend="bm25", tool_delay_s=delay_s) as slow:
        calls = [("list", {"path": ""}), ("cat", {"path": "../x"})]  # an answer and a refusal
        for name, arguments in calls:
            t0 = time.perf_counter()
            answer = await tool(http, slow, name, arguments)
            assert time.perf_counter() - t0 >= delay_s
            assert answer == await tool(http, plain, name, arguments)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "token"}])
async def test_every_route_requires_the_bearer_token(
    env: FinQAServers, http: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    assert (await post(http, env.tool_url, function_call("list", {"path": ""}), headers))[0] == 401
    assert (await post(http, env.grader_url, {}, headers))[0] == 401
    async with http.get(f"{env.base_url}/calls/trace_finqa", headers=headers) as resp:
        assert resp.status == 401


def test_specs_share_one_url(env: FinQAServers) -> None:
    specs = env.tool_specs()
    assert [s.name for s in specs] == [t["function"]["name"] for t in TOOLS] == ["search", "list", "cat"]
    assert {s.server_url for s in specs} == {env.tool_url} and all(s.headers == env.headers for s in specs)
    assert env.grader_spec().url == env.grader_url


def test_embeddings_are_cached_in_the_corpus_dir(corpus: Path) -> None:
    FinQATools(corpus, backend="embedding")  # computes the matrix, or finds it from the env fixture
    [cache] = corpus.glob(".embeddings-*.npy")
    mtime = cache.stat().st_mtime_ns
    again = FinQATools(corpus, backend="embedding")
    assert cache.stat().st_mtime_ns == mtime  # read, not rewritten
    assert again.search(again.titles[3], 1).startswith(again.paths[3])


def test_the_embedding_searcher_keeps_its_one_thread_to_itself() -> None:
    """Its worker runs on one torch thread; the process's other threads (the demo builds and
    warm-starts the tiny model beside the server) must keep theirs. Torch's thread counts are
    process state, hence a fresh interpreter."""
    code = """
import threading, torch
torch.set_num_threads(2)
from rft_cluster.envs.finqa.search import EmbeddingSearcher
searcher = EmbeddingSearcher(["net income 2021", "revenue 2020"])
seen = []
def new_thread():
    torch.ones(4).sum()  # a thread takes its count at its first torch op
    seen.append(torch.get_num_threads())
thread = threading.Thread(target=new_thread)
thread.start()
thread.join()
torch.ones(4).sum()
print(torch.get_num_threads(), seen[0], searcher._worker.submit(torch.get_num_threads).result())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["2", "2", "1"]  # main thread, a later thread, the searcher's worker


# --- grader ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("output_text", "answer", "expected"),
    [
        ("Net income: 88.9", 88.9, 1.0),
        ("It was $88.9M in Q3 2019, i.e. 88.90 million: 88.90", 88.9, 1.0),
        ("Cash: $1,204.5 million", 1204.5, 1.0),
        ("A loss of -$12.3M", -12.3, 1.0),
        ("Headcount: 1685", 1685, 1.0),
        ("about 89", 88.9, 0.5),  # rounded to fewer decimals
        ("1205", 1204.5, 0.5),  # rounded half up
        ("1204", 1204.5, 0.5),  # rounded half to even
        ("1204.9", 1204.5, 0.5),  # 0.03 % off
        ("1686", 1685, 0.5),  # 0.06 % off
        ("88", 88.9, 0.0),  # truncated, 1 % off
        ("88.8", 88.9, 0.0),  # 0.11 % off
        ("12.3", -12.3, 0.0),  # wrong sign
        ("1690", 1685, 0.0),
        ("88.9 in Q3 2019", 88.9, 0.0),  # the last number is the year
        ("I don't know", 88.9, 0.0),
    ],
)
async def test_grader_gives_partial_credit(
    env: FinQAServers, http: aiohttp.ClientSession, output_text: str, answer: float, expected: float
) -> None:
    body = {"sample": {"output_text": output_text}, "item": {"answer": answer}, "trace_id": "trace_grade"}
    status, text = await post(http, env.grader_url, body, env.headers)
    assert status == 200 and json.loads(text) == {"score": expected}
    assert env.grades("trace_grade")[-1]["score"] == expected


async def test_grader_rejects_bodies_it_cannot_score(env: FinQAServers, http: aiohttp.ClientSession) -> None:
    for item in ({}, {"answer": "88.9"}, {"answer": True}):
        body = {"sample": {"output_text": "88.9"}, "item": item, "trace_id": "trace_bad"}
        assert (await post(http, env.grader_url, body, env.headers))[0] == 400
    assert env.grades("trace_bad") == []


def test_last_number_reads_signs_dollars_and_commas() -> None:
    assert last_number("Q3 2019: -$1,204.5M") == (-1204.5, 1)
    assert last_number("$-7") == (-7.0, 0)
    assert last_number("ACC-0137 and FY2019") == (137.0, 0)
    assert last_number("in Q3") is None
    assert score("no number", 1.0) == (0.0, None)


# --- datasets and demonstrations -------------------------------------------------------------------


def test_datasets_are_valid_disjoint_and_answered_by_their_report(tmp_path: Path, corpus: Path) -> None:
    reports = generate_reports(SEED, N_COMPANIES)
    splits = split_questions(reports, SEED, n_train=60, n_valid=20)
    train_path, valid_path = write_datasets(tmp_path, splits)
    assert check_dataset(train_path) == [] and check_dataset(valid_path) == []
    train, valid = read_rows(train_path), read_rows(valid_path)
    assert (len(train), len(valid), len(splits.demo)) == (60, 20, len(reports) - 80)
    paths = [{r["path"] for r in train}, {r["path"] for r in valid}, {q.report.path for q in splits.demo}]
    assert not (paths[0] & paths[1] or paths[0] & paths[2] or paths[1] & paths[2])
    for row in train + valid:
        assert row["tools"] == TOOLS and row["messages"][-1]["role"] == "user"
        assert row["company"] in row["messages"][-1]["content"]
        assert f"- {METRIC_LABELS[row['metric']].lower()}: {row['answer']}" in (corpus / row["path"]).read_text().splitlines()
    assert write_datasets(tmp_path / "again", split_questions(reports, SEED, 60, 20))[0].read_bytes() == train_path.read_bytes()
    with pytest.raises(ValueError):
        split_questions(reports, SEED, n_train=len(reports), n_valid=1)


@pytest.fixture(scope="module")
def demonstrations(env: FinQAServers, tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Question, dict[str, Any]]]:
    """(question, demonstration), written by a FinQATools of their own (as a job does before it
    starts the server) for the reports no dataset asks about."""
    questions = split_questions(generate_reports(SEED, N_COMPANIES), SEED, n_train=40, n_valid=16).demo
    tools = FinQATools(env.tools.root, backend=env.tools.searcher.backend)  # type: ignore[arg-type]
    path = write_demonstrations(tmp_path_factory.mktemp("demos") / "sft.jsonl", tools, questions, SEED)
    return list(zip(questions, read_rows(path), strict=True))


def tool_calls(demo: dict[str, Any]) -> list[dict[str, str]]:
    return [m["tool_calls"][0]["function"] for m in demo["messages"] if m.get("tool_calls")]


def test_demonstrations_waste_calls_and_answer_right(demonstrations: list[tuple[Question, dict[str, Any]]]) -> None:
    calls = [tool_calls(demo) for _, demo in demonstrations]
    assert 5.7 <= statistics.mean(len(c) for c in calls) <= 7.0  # about 6-7, as the hosted demo's ~6.9
    assert min(len(c) for c in calls) >= 2 and max(len(c) for c in calls) <= 10  # inside a 10-call budget
    assert sum(any(a == b for a, b in zip(c, c[1:])) for c in calls) > len(calls) / 2  # repeated calls
    # No waste is near-certain at its turn, so a policy cloned from these samples the cheaper choice too.
    rights = [{"name": "cat", "arguments": json.dumps({"path": q.report.path})} for q, _ in demonstrations]
    search_repeated = statistics.mean(c[1] == c[0] for c in calls)
    right_report_first = statistics.mean(next(f for f in c if f["name"] == "cat") == r for c, r in zip(calls, rights))
    reread = statistics.mean(c[-2] == c[-1] for c in calls)
    assert all(0.25 <= share <= 0.75 for share in (search_repeated, right_report_first, reread))
    for (question, demo), fns in zip(demonstrations, calls):
        messages = demo["messages"]
        assert demo["tools"] == TOOLS
        assert [m["role"] for m in messages] == ["system", "user"] + ["assistant", "tool"] * len(fns) + ["assistant"]
        for call, output in zip(messages[2::2], messages[3::2]):
            assert output["tool_call_id"] == call["tool_calls"][0]["id"]
            assert isinstance(call["tool_calls"][0]["function"]["arguments"], str)
        assert fns[-1] == {"name": "cat", "arguments": json.dumps({"path": question.report.path})}
        assert score(messages[-1]["content"], question.answer) == (1.0, question.answer)


async def test_demonstration_outputs_are_what_the_server_returns(
    env: FinQAServers, http: aiohttp.ClientSession, demonstrations: list[tuple[Question, dict[str, Any]]]
) -> None:
    for _, demo in demonstrations[:12]:
        messages = demo["messages"]
        for call, output in zip(messages[2::2], messages[3::2]):
            fn = call["tool_calls"][0]["function"]
            assert await tool(http, env, fn["name"], fn["arguments"]) == (200, output["content"])


def test_demonstrations_encode_with_the_tiny_chat_template(demonstrations: list[tuple[Question, dict[str, Any]]]) -> None:
    """`rft-cluster sft` lays them out with ChatCodec: the loss falls on the calls and the answer only."""
    from rft_cluster.chat import ChatCodec
    from rft_cluster.tiny_model import build_tokenizer

    codec = ChatCodec(build_tokenizer(0))
    question, demo = demonstrations[0]
    ids, mask = codec.conversation_ids(demo["messages"], demo["tools"])
    learned = codec.decode([i for i, m in zip(ids, mask) if m])
    assert '"name": "cat"' in learned and learned.rstrip().endswith(f"{question.answer}<|im_end|>")
    assert question.report.title not in learned  # tool outputs are context, not targets


def test_sft_batches_each_demonstration_once_an_epoch_with_little_padding(
    demonstrations: list[tuple[Question, dict[str, Any]]],
) -> None:
    """Batches of similar length: the demo's SFT pads each batch to its longest demonstration."""
    import torch

    from rft_cluster.chat import ChatCodec
    from rft_cluster.sft import epoch_batches, padding_fraction
    from rft_cluster.tiny_model import build_tokenizer

    codec = ChatCodec(build_tokenizer(0))
    lengths = [len(codec.conversation_ids(demo["messages"], demo["tools"])[0]) for _, demo in demonstrations]
    shuffle = torch.Generator().manual_seed(0)
    epochs = [epoch_batches(lengths, 8, shuffle) for _ in range(2)]
    for batches in epochs:
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        assert all(len(b) == 8 for b in batches[:-1])
    assert epochs[0] != epochs[1]  # each epoch is a new shuffle

    randomly = [torch.randperm(len(lengths), generator=torch.Generator().manual_seed(s)).tolist() for s in range(4)]
    random_padding = statistics.mean(padding_fraction(lengths, [order[i : i + 8] for i in range(0, len(order), 8)]) for order in randomly)
    assert all(padding_fraction(lengths, batches) < 0.6 * random_padding for batches in epochs)
