"""Agentic generation against plain batched generation of the same token volume, on one engine.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_generation.py [--model DIR] [--prompts 32 --group 4]

One vLLM engine (a `RolloutWorker`, run in this process) first runs `prompts x group` ledger
rollouts at once through a tool proxy and the ledger's tool server on 127.0.0.1 (the agent
loop: generate a turn, parse the call, call the tool, append the observation, generate again);
then, with an emptied prefix cache, plain generation: one request per rollout, all at once,
with the same prompt and exactly as many tokens as that rollout sampled (ignore_eos). Each
phase runs `repeats` times, alternating, and the faster run of each counts (other work on the
machine only ever slows a run). `agentic_over_pure` is agentic tokens/s over plain tokens/s.

Without --model the ledger's tiny model is built and warm-started here (~1.5 min on 2 cores),
as the tests do, so the policy really calls its tool. Writes benchmarks/results/generation.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import ray

from rft_cluster.config import EngineSpec, ToolSettings, ToolSpec
from rft_cluster.dataset import load_rows
from rft_cluster.rollout_worker import RolloutWorker, SamplingSettings
from rft_cluster.tool_proxy import ToolProxy
from rft_cluster.types import RolloutRequest, Trajectory, new_trace_id

from common import RESULTS, write_result  # benchmarks/common.py, beside this script

LEDGER_SEED = 0
SETTINGS = SamplingSettings(temperature=1.0, max_tokens_per_turn=48, max_episode_steps=4)  # the ledger job's


def build_model(out: Path) -> tuple[Path, Path]:
    """The tests' warm-started ledger model and its datasets: (model dir, data dir)."""
    from rft_cluster.envs.ledger import write_datasets, write_demonstrations
    from rft_cluster.sft import sft
    from rft_cluster.tiny_model import make_tiny_model

    write_datasets(out / "data", seed=LEDGER_SEED)
    write_demonstrations(out / "data" / "sft.jsonl", seed=LEDGER_SEED, n=64)
    corpus = [out / "data" / name for name in ("train.jsonl", "valid.jsonl", "sft.jsonl")]
    sft(str(make_tiny_model(out / "tiny-model", corpus=corpus)), out / "data" / "sft.jsonl", out / "warm-model", epochs=8, learning_rate=2e-3)
    return out / "warm-model", out / "data"


def _serve_ledger(conn: Any) -> None:
    """Child process: the ledger's tool server, until the parent closes the pipe."""
    from rft_cluster.envs.ledger import LedgerServers

    with LedgerServers(seed=LEDGER_SEED) as env:
        conn.send(env.tool_specs())
        with contextlib.suppress(EOFError):  # the parent is done
            conn.recv()


@contextlib.contextmanager
def ledger_tools() -> Iterator[list[ToolSpec]]:
    """The ledger's tool server in its own process (as a user's tools would be), not a thread of
    this one, whose event loop runs the agent loops; yields its tool specs."""
    parent, child = multiprocessing.get_context("spawn").Pipe()
    proc = multiprocessing.get_context("spawn").Process(target=_serve_ledger, args=(child,), daemon=True)
    proc.start()
    try:
        yield parent.recv()
    finally:
        parent.close()
        proc.join(timeout=10)
        proc.kill()


def requests(rows: list[dict], prompts: int, group: int) -> list[RolloutRequest]:
    return [
        RolloutRequest(new_trace_id(), str(i), f"bench-{i}", 0, row["messages"], row["tools"], {k: v for k, v in row.items() if k not in ("messages", "tools")})
        for i, row in enumerate(rows[:prompts])
        for _ in range(group)
    ]


async def agentic(worker: RolloutWorker, reqs: list[RolloutRequest]) -> tuple[float, list[Trajectory]]:
    await worker.engine.reset_prefix_cache()
    t0 = time.perf_counter()
    trajs = await asyncio.gather(*(worker.rollout(r, SETTINGS) for r in reqs))
    return time.perf_counter() - t0, list(trajs)


async def plain(worker: RolloutWorker, trajs: list[Trajectory]) -> float:
    """All rollouts' prompts at once, each generating as many tokens as its rollout sampled."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    async def one(t: Trajectory) -> int:
        params = SamplingParams(
            temperature=1.0, max_tokens=t.generated_tokens, ignore_eos=True, logprobs=0,
            detokenize=False, output_kind=RequestOutputKind.FINAL_ONLY,
        )
        prompt = TokensPrompt(prompt_token_ids=t.token_ids[: t.prompt_len])
        async for out in worker.engine.generate(prompt, params, request_id=f"plain-{new_trace_id()}"):
            final = out
        return len(final.outputs[0].token_ids)

    await worker.engine.reset_prefix_cache()
    t0 = time.perf_counter()
    counts = await asyncio.gather(*(one(t) for t in trajs))
    seconds = time.perf_counter() - t0
    assert sum(counts) == sum(t.generated_tokens for t in trajs), "plain generation must produce the same token volume"
    return seconds


async def measure(worker: RolloutWorker, rows: list[dict], prompts: int, group: int, repeats: int) -> dict[str, Any]:
    await worker.start()
    try:
        return await _measure(worker, rows, prompts, group, repeats)
    finally:
        await worker.shutdown()


async def _measure(worker: RolloutWorker, rows: list[dict], prompts: int, group: int, repeats: int) -> dict[str, Any]:
    await agentic(worker, requests(rows[prompts:], 2, group))  # warm-up: first-call allocations
    best_a: tuple[float, list[Trajectory], dict] | None = None
    best_p = float("inf")
    for _ in range(repeats):
        before = await worker.engine_stats()
        seconds, trajs = await agentic(worker, requests(rows, prompts, group))
        after = await worker.engine_stats()
        delta = {k: after[k] - before[k] for k in ("busy_s", "generated_tokens", "prompt_tokens", "cached_prompt_tokens", "requests")}
        if best_a is None or seconds < best_a[0]:
            best_a = (seconds, trajs, delta)
        best_p = min(best_p, await plain(worker, trajs))
    seconds, trajs, stats = best_a
    tokens = sum(t.generated_tokens for t in trajs)
    agentic_tps, plain_tps = tokens / seconds, tokens / best_p
    return {
        "agentic_over_pure": round(agentic_tps / plain_tps, 3),
        "rollouts": len(trajs),
        "generated_tokens": tokens,
        "turns": sum(t.num_turns for t in trajs),
        "tool_calls": sum(len(t.tool_calls) for t in trajs),
        "agentic_s": round(seconds, 3),
        "plain_s": round(best_p, 3),
        "agentic_tokens_per_s": round(agentic_tps, 1),
        "plain_tokens_per_s": round(plain_tps, 1),
        "agentic_engine_busy_fraction": round(stats["busy_s"] / seconds, 3),
        "agentic_prompt_tokens": stats["prompt_tokens"],
        "agentic_prompt_tokens_cached": stats["cached_prompt_tokens"],
        "statuses": sorted({t.status.value for t in trajs}),
    }


def run(model: str | None = None, prompts: int = 32, group: int = 4, repeats: int = 2) -> dict[str, Any]:
    """The generation fragment of the throughput result: `agentic_over_pure` and its details."""
    from rft_cluster.envs.ledger import write_datasets

    with tempfile.TemporaryDirectory(prefix="bench-gen-") as tmp:
        if model is None:
            model_dir, data = build_model(Path(tmp))
        else:
            model_dir, data = Path(model), Path(tmp) / "data"
            write_datasets(data, seed=LEDGER_SEED)
        rows = load_rows(data / "train.jsonl")
        own_ray = not ray.is_initialized()  # inside benchmarks/throughput.py Ray is up already
        if own_ray:
            os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
            ray.init(num_cpus=4, include_dashboard=False)
        try:
            with ledger_tools() as tools:
                proxy = ray.remote(num_cpus=0)(ToolProxy).remote(tools, ToolSettings())
                worker = RolloutWorker(str(model_dir), EngineSpec(dtype="float32", max_model_len=2048), 0, [proxy])
                return asyncio.run(measure(worker, rows, prompts, group, repeats))
        finally:
            if own_ray:
                ray.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a warm-started ledger model directory (default: build one)")
    parser.add_argument("--prompts", type=int, default=32, help="ledger training rows (at most 46)")
    parser.add_argument("--group", type=int, default=4, help="rollouts per prompt")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args()
    result = run(args.model, args.prompts, args.group, args.repeats)
    write_result(args.results, "generation.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
