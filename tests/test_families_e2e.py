"""Five model families, each a tiny model in its published chat format warm-started on ledger
demonstrations rendered by its own template, train 2 steps against the real ledger tool server:
vLLM's parsers read the calls, the tool server sees them under the rollouts' trace ids, each
observation is the template's own rendering of the whole conversation, the loss mask covers
sampled ids only, reasoning is counted, and weights are published every step."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from rft_cluster.chat import ChatCodec
from rft_cluster.config import EndpointGrader, load_job
from rft_cluster.driver import train
from rft_cluster.families import FAMILIES
from rft_cluster.formats import TurnParser
from rft_cluster.trajectory_store import TrajectoryStore
from tests.conftest import LEDGER_JOB, _built

pytestmark = pytest.mark.slow

FAMILY_NAMES = ["hermes", "qwen3", "llama3", "mistral", "qwen3_coder"]


def _with_reasoning(demos: Path, out: Path) -> Path:
    """Qwen3-style demonstrations: each assistant turn thinks briefly before it acts."""
    rows = [json.loads(line) for line in demos.read_text().splitlines()]
    for row in rows:
        for m in row["messages"]:
            if m["role"] == "assistant":
                m["reasoning_content"] = "I call the lookup tool." if m.get("tool_calls") else "The tool gave the balance."
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def family_model(request: pytest.FixtureRequest, ledger_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """(family, the tiny model of that family warm-started on ledger demonstrations)."""
    name = request.param
    if name == "hermes":  # the session's own warm model is this family
        return name, request.getfixturevalue("warm_model_dir")
    from rft_cluster.sft import sft
    from rft_cluster.tiny_model import make_tiny_model

    def build(out: Path) -> None:
        demos = ledger_data / "sft.jsonl"
        if FAMILIES[name].reasoning_parser:
            demos = _with_reasoning(demos, out.parent / f"sft-{name}.jsonl")
        base = out.parent / f"base-{name}"
        make_tiny_model(base, family=name, corpus=[ledger_data / "train.jsonl", demos], pretrain_steps=40, num_layers=2)
        sft(str(base), demos, out, epochs=6, learning_rate=2e-3)

    return name, _built(f"warm-{name}", build, tmp_path_factory, "tiny_model.py", "families.py", f"templates/{name}.jinja",
                        "sft.py", "chat.py", "learner.py", "envs/ledger.py")


def _runs(ids: list[int], mask: list[int]) -> list[tuple[int, list[int]]]:
    """(mask value, ids) of each maximal run of equal mask values."""
    runs: list[tuple[int, list[int]]] = []
    for i, m in zip(ids, mask):
        if runs and runs[-1][0] == m:
            runs[-1][1].append(i)
        else:
            runs.append((m, [i]))
    return runs


def check_observations_are_the_templates(row: dict, codec: ChatCodec, parser: TurnParser, messages: list[dict], tools: list[dict]) -> int:
    """The rollout's observations tile the template's rendering of the whole conversation: the
    prompt is its start, each observation's text follows, in order, a stretch that is the
    template's rendering of the turn before it (ending on a stop token and read back to the
    same calls as the sampled turn). Returns the number of observations checked."""
    runs = _runs(row["token_ids"], row["loss_mask"])
    request = parser.request(messages, tools)
    conversation = list(messages)
    turns = []  # (sampled ids, calls) per turn
    calls_done = 0
    for k in range(1, len(runs), 2):
        ids = runs[k][1]
        turn = parser.parse(codec.turn_text(ids), ids, [], request)
        conversation.append(turn.message())
        for c in turn.calls:
            out = row["tool_calls"][calls_done]
            conversation.append({"role": "tool", "content": out["output"], "tool_call_id": c.id, "name": c.name})
            calls_done += 1
        turns.append(turn)
    rendered = codec.tokenizer.apply_chat_template(conversation, tools=tools, tokenize=False)
    prompt = codec.decode(runs[0][1])
    assert rendered.startswith(prompt)
    pos, checked = len(prompt), 0
    for k in range(2, len(runs), 2):
        obs = codec.decode(runs[k][1])
        stop = next((t for t in codec._stop_texts if obs.startswith(t)), "")  # a turn max_tokens cut: closed by us
        obs = obs[len(stop):]
        at = rendered.find(obs, pos)
        assert at > pos, f"observation {obs!r} is not in the template's rendering after position {pos}"
        stretch = rendered[pos:at]
        assert any(stretch.endswith(t) for t in codec._stop_texts), stretch
        # The template's rendering of the turn reads back to the calls the sampled turn made.
        again = parser.parse(stretch, codec.encode(stretch), [], request)
        assert [(c.name, json.loads(c.arguments)) for c in again.calls if not c.error] == \
               [(c.name, json.loads(c.arguments)) for c in turns[k // 2 - 1].calls if not c.error]
        pos, checked = at + len(obs), checked + 1
    return checked


@pytest.mark.timeout(1800)
def test_each_family_trains_two_steps_with_its_calls_read_by_vllms_parser(
    ray_local, family_model, ledger_data: Path, ledger_env, trace_grader: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name, model = family_model
    fam = FAMILIES[name]
    shutil.copytree(model, tmp_path / "warm-model")
    shutil.copytree(ledger_data, tmp_path / "data")
    for var, value in (("RFT_DEMO_DIR", str(tmp_path)), ("RFT_DEMO_URL", ledger_env.base_url),
                       ("RFT_DEMO_TOKEN", ledger_env.token), ("WANDB_SILENT", "true")):
        monkeypatch.setenv(var, value)
    job = load_job(LEDGER_JOB)
    job.validation_file = None  # two training steps say what this test asks
    hp = job.rl.hyperparameters
    hp.batch_size, hp.max_tokens_per_turn = 2, 96
    job.rl.grader = EndpointGrader(type="endpoint", name="by-trace", url=trace_grader)

    result = train(job, tmp_path / "run", max_steps=2)
    assert result["steps"] == 2

    codec = ChatCodec.for_model(str(model))
    parser = TurnParser(codec.tokenizer)
    assert (parser.tool_call_parser, parser.reasoning_parser) == (fam.tool_call_parser, fam.reasoning_parser)
    rows = TrajectoryStore(tmp_path / "run").read("train").to_pylist()
    assert len(rows) == 2 * 2 * 4
    by_question = {row["messages"][-1]["content"]: row for row in map(json.loads, (ledger_data / "train.jsonl").read_text().splitlines())}
    ok_calls = [c for r in rows for c in r["tool_calls"] if c["status"] == "ok"]
    assert len(ok_calls) >= len(rows) // 2, f"{name}: {len(ok_calls)} calls read and executed in {len(rows)} rollouts"
    observed = 0
    for r in rows:
        # Executed calls reached the tool server under this rollout's trace id, with their ids.
        sent = [c for c in r["tool_calls"] if c["status"] != "malformed"]
        assert [c["call_id"] for c in ledger_env.calls(r["trace_id"])] == [c["call_id"] for c in sent]
        # Names and arguments as the parser read them: JSON objects (a weakly trained model may
        # leave one out, and the tool then says so); every call the tool served named the account.
        for c in sent:
            assert c["name"] == "lookup" and isinstance(json.loads(c["arguments"]), dict), c
            assert c["status"] != "ok" or set(json.loads(c["arguments"])) == {"account"}, c
        # Only sampled ids carry a logprob's weight version, and those are all of the mask.
        assert [v >= 0 for v in r["weight_versions"]] == [m == 1 for m in r["loss_mask"]]
        assert r["unparsed_call_like"] == [] or all(p == fam.tool_call_parser for p in r["unparsed_call_like"])
        if r["status"] in ("ok", "budget_exhausted") and r["tool_calls"]:
            prompt = codec.decode(r["token_ids"][: r["prompt_len"]])
            row = next(v for q, v in by_question.items() if q in prompt)
            observed += check_observations_are_the_templates(r, codec, parser, row["messages"], row["tools"])
        if fam.reasoning_parser:
            recount = sum(parser.parse(codec.turn_text(ids), ids, [], parser.request([], [])).reasoning_tokens
                          for m, ids in _runs(r["token_ids"], r["loss_mask"]) if m == 1)
            assert r["reasoning_tokens"] == recount
    assert observed > 0, f"{name}: no observation checked against the template"
    print(f"\n[families] {name}: parsers {parser.describe()}, {len(ok_calls) / len(rows):.2f} calls read and executed "
          f"per rollout, {observed} observations equal to the template's rendering, reasoning tokens "
          f"{sum(r['reasoning_tokens'] for r in rows)}, unparsed call-like turns {sum(len(r['unparsed_call_like']) for r in rows)}, "
          f"statuses {sorted(Counter(r['status'] for r in rows).items())}")
    if fam.reasoning_parser:
        assert sum(r["reasoning_tokens"] for r in rows) > 0
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(m["train/weight_sync_bytes"] > 0 for m in metrics)
    # The step's count of unread call-like turns is its stored rollouts' (each turn once).
    assert [m["format/unparsed_call_like"] for m in metrics] == \
           [sum(len(r["unparsed_call_like"]) for r in rows if r["step"] == m["step"]) for m in metrics]
