"""Rollout worker actor: one vLLM AsyncLLM engine, many concurrent multi-turn agent loops.

Each agent loop is a coroutine, so a trajectory waiting on a tool leaves the engine to the
others (continuous batching). Trajectories are token-exact (see `chat.py`): the ids the engine
was given and sampled, a loss mask that is 1 on sampled ids only, each sampled id's logprob
and the weight version that produced it.

One Ray call runs one rollout, so the driver sees each as it ends. Weights are loaded between
two engine steps (`start_weight_update` ... `finish_weight_update`) while in-flight rollouts wait in
the engine and then go on; each token's version says which weights sampled it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import ray

from rft_cluster.chat import ChatCodec, TemplateError
from rft_cluster.config import EngineSpec
from rft_cluster.formats import ParsedCall, TurnParser
from rft_cluster.pipeline import lost_trajectory
from rft_cluster.tool_proxy import ProxyClient
from rft_cluster.types import RolloutRequest, RolloutStatus, ToolCallStatus, ToolResult, Trajectory, grader_sample
from rft_cluster.weight_transfer import resolve_backend


def turn_seed(seed: int, trace_id: str, turn: int) -> int:
    """The sampling seed of one turn of one rollout: the same in every process and run (Python's
    `hash` of a string is salted per process, so a seeded run would not repeat)."""
    digest = hashlib.blake2b(f"{seed}/{trace_id}/{turn}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 2**31


@dataclass
class SamplingSettings:
    temperature: float
    max_tokens_per_turn: int
    max_episode_steps: int  # tool-call budget per rollout
    rollout_timeout_s: float = 600.0
    seed: int | None = None
    reasoning_effort: str | None = None  # None: the template's own default


@dataclass
class _Turn:
    """One generate request's result: each sampled id with its logprob and weight version."""

    ids: list[int]
    logprobs: list[float]
    versions: list[int]
    finished: bool  # ended by eos, not cut off by max_tokens


@dataclass
class _Episode:
    """Mutable state of one agent loop."""

    ids: list[int]
    mask: list[int]
    logprobs: list[float]
    versions: list[int]
    tool_calls: list[ToolResult] = field(default_factory=list)
    assistant_messages: list[dict] = field(default_factory=list)
    turns: int = 0
    reasoning_tokens: int = 0
    unparsed_call_like: list[str] = field(default_factory=list)  # see Trajectory

    def shown(self, ids: list[int]) -> None:
        """Appends ids the policy is given (prompt, tool results): no logprob, no version."""
        self.ids += ids
        self.mask += [0] * len(ids)
        self.logprobs += [0.0] * len(ids)
        self.versions += [-1] * len(ids)

    def sampled(self, turn: _Turn) -> None:
        self.ids += turn.ids
        self.mask += [1] * len(turn.ids)
        self.logprobs += turn.logprobs
        self.versions += turn.versions


class _EngineStats:
    """Cumulative accounting of this worker's generate requests (one per turn): `busy_s` is the
    wall time with at least one in flight, `since_s` the time since the worker was made;
    `cached_prompt_tokens` are prompt tokens the prefix cache served (not recomputed)."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.in_flight = 0
        self.busy_since = 0.0
        self.busy_s = 0.0
        self.counts = dict(generated_tokens=0, prompt_tokens=0, cached_prompt_tokens=0, requests=0)

    @contextlib.contextmanager
    def request(self, prompt_tokens: int) -> Iterator[None]:
        if self.in_flight == 0:
            self.busy_since = time.monotonic()
        self.in_flight += 1
        self.counts["requests"] += 1
        self.counts["prompt_tokens"] += prompt_tokens
        try:
            yield
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self.busy_s += time.monotonic() - self.busy_since

    def add_output(self, generated: int, cached: int) -> None:
        self.counts["generated_tokens"] += generated
        self.counts["cached_prompt_tokens"] += cached

    def snapshot(self) -> dict[str, float]:
        now = time.monotonic()
        busy = self.busy_s + (now - self.busy_since if self.in_flight else 0.0)
        return {"busy_s": busy, "since_s": now - self.t0, "in_flight": self.in_flight, **self.counts}


class RolloutWorker:
    """Ray actor (async). The driver wraps it with `ray.remote` and its resources."""

    def __init__(self, model: str, engine: EngineSpec, seed: int, tool_proxies: list[Any]):
        self.model = model
        self.spec = engine
        self.seed = seed
        self.tools = ProxyClient(tool_proxies)
        self.weight_version = 0
        self.engine: Any = None
        self.codec: ChatCodec | None = None
        self.parser: TurnParser | None = None
        self.node_id = ray.get_runtime_context().get_node_id()
        self._stats = _EngineStats()
        self._effort_checked = False  # warned once if the template ignores reasoning_effort
        self.transfer_backend = ""  # resolved at start
        self._transfer_ready = False
        self._staging: Any = None  # staging.Staging, for buckets from another node

    async def start(self) -> dict[str, Any]:
        """Starts the engine (seconds to a minute); returns facts about it."""
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(self.spec.cpu_kv_cache_gb))))
        from vllm import AsyncEngineArgs
        from vllm.config import WeightTransferConfig
        from vllm.v1.engine.async_llm import AsyncLLM

        from vllm.platforms import current_platform

        self.transfer_backend = resolve_backend(self.spec.weight_transfer, on_gpu=not current_platform.is_cpu())
        args = AsyncEngineArgs(
            model=self.model,
            dtype=self.spec.dtype,
            max_model_len=self.spec.max_model_len,
            gpu_memory_utilization=self.spec.gpu_memory_utilization,
            max_num_seqs=self.spec.max_num_seqs,
            enforce_eager=self.spec.enforce_eager,
            # Unrun here (one CPU engine): on GPUs, TP > 1 makes vLLM start one worker per GPU
            # of the actor's bundle (resources.rollout_worker.gpus >= tensor_parallel_size).
            tensor_parallel_size=self.spec.tensor_parallel_size,
            seed=self.seed,
            # A group's rollouts share their prompt, and each turn of a conversation extends the
            # last: both are computed once (vLLM's default for generation; set so it stays on).
            enable_prefix_caching=True,
            # vLLM's own metrics cost per-token work in this process and per step in the engine;
            # `engine_stats` keeps what the driver needs.
            disable_log_stats=True,
            # vLLM's weight-transfer protocol, with the backend the learner publishes through
            # (`weight_transfer.py`).
            weight_transfer_config=WeightTransferConfig(backend=self.transfer_backend),
        )
        t0 = time.perf_counter()
        self.engine = AsyncLLM.from_engine_args(args)
        self.codec = ChatCodec.for_model(self.model)
        self.parser = TurnParser(self.codec.tokenizer, self.spec.tool_call_parser, self.spec.reasoning_parser)
        await self.engine.update_weight_version(str(self.weight_version))  # vLLM's initial label is "default"
        return {"startup_s": time.perf_counter() - t0, "pid": os.getpid(), "parsers": self.parser.describe(),
                "weight_transfer": self.transfer_backend}

    # ---------------------------------------------------------------- agent loops

    async def rollout(self, request: RolloutRequest, settings: SamplingSettings) -> Trajectory:
        """Runs one rollout to its end (one Ray call each, so the driver gets each as it ends)."""
        t0 = time.perf_counter()
        ep = _Episode([], [], [], [])
        timeout = settings.rollout_timeout_s
        try:
            status, error = await asyncio.wait_for(self._agent_loop(request, settings, ep), timeout=timeout)
        except asyncio.TimeoutError:
            status, error = RolloutStatus.TIMEOUT, f"rollout exceeded {timeout} s"
        except Exception as e:  # an engine fault ends this rollout only, and is recorded
            status, error = RolloutStatus.ENGINE_FAILED, f"{type(e).__name__}: {e}"
        latency = time.perf_counter() - t0
        try:
            return self._trajectory(request, ep, status, error, latency)
        except Exception as e:  # RecursionError included: this rollout ends, never the run
            # Whole: the driver redacts error texts with the job's redactor, then cuts them.
            return replace(lost_trajectory(request, f"building the trajectory: {type(e).__name__}: {e}", self.node_id),
                           status=RolloutStatus.INTERNAL_ERROR, num_turns=ep.turns, latency_s=latency)

    async def _agent_loop(self, req: RolloutRequest, s: SamplingSettings, ep: _Episode) -> tuple[RolloutStatus, str | None]:
        assert self.codec is not None and self.parser is not None, "start() first"
        if s.reasoning_effort and not self._effort_checked:
            self._effort_checked = True
            if not self.codec.template_uses("reasoning_effort"):
                print(f"[rft] reasoning_effort {s.reasoning_effort!r} has no effect: {self.model}'s chat template "
                      "has no `reasoning_effort` variable", file=sys.stderr)
        variables = self._variables(s)
        prompt = self.codec.prompt_ids(req.messages, req.tools, **variables)
        ep.shown(prompt)
        if len(prompt) >= self.spec.max_model_len:  # not the policy's doing: nothing to learn
            return RolloutStatus.ENGINE_FAILED, f"prompt of {len(prompt)} tokens does not fit max_model_len {self.spec.max_model_len}"
        request = self.parser.request(req.messages, req.tools, variables)
        while True:
            room = self.spec.max_model_len - len(ep.ids)
            if room <= 0:
                return RolloutStatus.BUDGET_EXHAUSTED, "context length exhausted"
            turn = await self._generate(ep.ids, min(s.max_tokens_per_turn, room), s, req.trace_id, ep.turns)
            # Parsed against its context before the turn joins it (the parser keeps no reference).
            parsed = self.parser.parse(self.codec.turn_text(turn.ids), turn.ids, ep.ids, request)
            ep.sampled(turn)
            ep.turns += 1
            ep.reasoning_tokens += parsed.reasoning_tokens
            if parsed.unparsed_call_like is not None:
                ep.unparsed_call_like.append(parsed.unparsed_call_like)
            message = parsed.message()
            ep.assistant_messages.append(message)
            if not parsed.calls:
                return RolloutStatus.OK, None
            if len(ep.tool_calls) + len(parsed.calls) > s.max_episode_steps:
                return RolloutStatus.BUDGET_EXHAUSTED, f"tool-call budget of {s.max_episode_steps} exhausted"
            calls = message["tool_calls"]
            results = await asyncio.gather(*(self._call_tool(c, req) for c in parsed.calls))
            ep.tool_calls += results
            fatal = next((r for r in results if r.fatal), None)
            if fatal is not None:
                return RolloutStatus.TOOL_FAILED, f"tool {fatal.name!r}: {fatal.status.value}: {fatal.output}"  # cut by the driver
            try:
                if not turn.finished:  # cut off by max_tokens: close the turn as the template would
                    ep.shown(self.codec.turn_end_ids(calls))
                ep.shown(self.codec.observation_ids(calls, [r.output for r in results]))
            except TemplateError as e:  # the policy's doing (e.g. parallel calls where the template takes one)
                return RolloutStatus.FORMAT_FAILED, str(e)

    @staticmethod
    def _variables(s: SamplingSettings) -> dict[str, Any]:
        """The chat template's variables beyond messages and tools."""
        return {"reasoning_effort": s.reasoning_effort} if s.reasoning_effort else {}

    async def warm_up(self, req: RolloutRequest, s: SamplingSettings, n: int) -> None:
        """Samples `n` first turns of `req`'s prompt at once and keeps nothing: the engine builds
        its kernels and caches on the run's own shapes, and no tool or grader is called (the
        users' endpoints never see a rollout that is not stored)."""
        assert self.codec is not None, "start() first"
        prompt = self.codec.prompt_ids(req.messages, req.tools, **self._variables(s))
        room = self.spec.max_model_len - len(prompt)
        if room > 0:
            await asyncio.gather(*(self._generate(prompt, min(s.max_tokens_per_turn, room), s, f"{req.trace_id}-{i}", 0) for i in range(n)))

    async def _generate(self, ids: list[int], max_tokens: int, s: SamplingSettings, trace_id: str, turn: int) -> _Turn:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            temperature=s.temperature,
            max_tokens=max_tokens,
            logprobs=0,
            seed=None if s.seed is None else turn_seed(s.seed, trace_id, turn),
            # The agent loop decodes each turn once, itself, and needs only the finished turn
            # (whose weight-version spans cover every token): no per-token detokenizing and no
            # per-token output objects in this process, which shares the engine's cores.
            detokenize=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        with self._stats.request(len(ids)):
            async for final in self.engine.generate(TokensPrompt(prompt_token_ids=ids), params, request_id=f"{trace_id}-{turn}"):
                pass
        comp = final.outputs[0]
        token_ids = list(comp.token_ids)
        self._stats.add_output(len(token_ids), final.num_cached_tokens or 0)
        # Spans of output positions [start, end) and the weight version the engine core stamped
        # on the steps that sampled them (see `finish_weight_update`).
        versions = [int(span.version) for span in comp.weight_versions or () for _ in range(span.start, span.end)]
        if len(versions) != len(token_ids):
            raise RuntimeError(f"the engine labelled {len(versions)} of {len(token_ids)} sampled tokens with a weight version")
        lps = [step[tok].logprob for tok, step in zip(token_ids, comp.logprobs)]
        return _Turn(token_ids, lps, versions, comp.finish_reason == "stop")

    async def _call_tool(self, call: ParsedCall, req: RolloutRequest) -> ToolResult:
        if call.error is not None:
            return ToolResult(call.id, call.name, call.arguments, f"Error: {call.error}", ToolCallStatus.MALFORMED)
        return await self.tools.call(call.name, call.arguments, call.id, req.trace_id, req.item)

    def _trajectory(self, req: RolloutRequest, ep: _Episode, status: RolloutStatus, error: str | None, latency: float) -> Trajectory:
        final = ep.assistant_messages[-1] if ep.assistant_messages else {"content": ""}
        output_text = final["content"] if status == RolloutStatus.OK else ""
        return Trajectory(
            trace_id=req.trace_id,
            prompt_id=req.prompt_id,
            group_id=req.group_id,
            step=req.step,
            token_ids=ep.ids,
            loss_mask=ep.mask,
            logprobs=ep.logprobs,
            weight_versions=ep.versions,
            prompt_len=ep.mask.index(1) if 1 in ep.mask else len(ep.ids),
            output_text=output_text,
            tool_calls=ep.tool_calls,
            status=status,
            num_turns=ep.turns,
            reasoning_tokens=ep.reasoning_tokens,
            unparsed_call_like=ep.unparsed_call_like,
            latency_s=latency,
            error=error,
            node_id=self.node_id,
            sample=grader_sample(output_text, ep.tool_calls),
        )

    async def engine_stats(self) -> dict[str, float]:
        """Cumulative counters (cheap): busy_s, since_s, in_flight, generated_tokens,
        prompt_tokens, cached_prompt_tokens, requests (see `_EngineStats`)."""
        return self._stats.snapshot()

    # ---------------------------------------------------------------- weights

    async def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> str:
        """Readies the engine's side of the weight transfer (a rendezvous for nccl); a second
        call (the learner's set of workers changed) first releases the previous one. Returns
        this worker's node, where the publisher's shared memory is reachable or not."""
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        if self._transfer_ready:
            await self.engine.shutdown_weight_transfer_engine()
        await self.engine.init_weight_transfer_engine(WeightTransferInitRequest(init_info=init_info))
        self._transfer_ready = True
        return self.node_id

    async def start_weight_update(self) -> None:
        """Pauses generation without ending in-flight requests, then readies the model for loading.

        In-flight requests stay in the engine, frozen between two generation steps (vLLM's
        pause mode "keep"); new ones queue. The KV cache is cleared now (`clear_cache=True`):
        the prefix cache must not serve blocks the old weights computed to later requests, and
        the in-flight requests are preempted, so on resume vLLM recomputes their context (prompt
        and tokens so far) with the new weights before sampling on. Recomputing costs one prefill
        per in-flight request per sync; in exchange every token sampled after the sync comes
        from the new policy alone, so its recorded logprob is the new policy's logprob of it
        given its whole context, and the learner's off-policy correction is exact. (Keeping the
        old KV would sample from a mix no policy defines.)
        """
        await self.engine.pause_generation(mode="keep", clear_cache=True)
        await self.engine.start_weight_update()

    async def update_weights(self, update_info: dict[str, Any] | list[dict[str, Any]]) -> None:
        """One bucket (or, for nccl, the broadcast) into the engine's workers. A bucket staged in
        another node's shared memory comes with its bytes in Ray's object store: they are staged
        here, where the engine's workers can map them."""
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        if isinstance(update_info, dict) and "bucket" in update_info:
            from rft_cluster.staging import Staging

            data = await update_info.pop("bucket")
            self._staging = self._staging or Staging()
            update_info["path"] = self._staging.write(data)
        await self.engine.update_weights(WeightTransferUpdateRequest(update_info=update_info))

    async def finish_weight_update(self, version: int) -> None:
        """vLLM finishes the load (re-processing the weights, e.g. CPU GEMM packing), labels the
        weights `version` and generation resumes.

        The label is exact per token: the engine core stamps each step's outputs with its current
        weight version, in its own process, at the step that sampled them, and the version is
        changed by a message that the core handles between steps while it is paused, before the
        resume message (its input queue is FIFO). So every token sampled before the pause carries
        the old version and every one after the resume the new one, however late the outputs
        reach this process.
        """
        await self.engine.finish_weight_update(str(version))
        self.weight_version = version
        await self.engine.resume_generation()

    async def prompt_logprobs(self, token_ids: list[int]) -> list[float]:
        """The engine's logprob of each token given its prefix (first token: none) — the
        ground truth for checking a weight sync against the learner."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        final = None
        async for out in self.engine.generate(TokensPrompt(prompt_token_ids=token_ids), params, request_id=f"plp-{uuid.uuid4().hex}"):
            final = out
        return [lp[tok].logprob for tok, lp in zip(token_ids[1:], final.prompt_logprobs[1:])]

    async def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
