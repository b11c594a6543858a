"""The GPU path of the learner and of the trainer side of a weight publish, checked on one GPU
where only torch is installed (no Ray, no vLLM): five checks, one printed line each
(`[gpu-check] <name>: ok|FAILED|skipped <figures>`), and a JSON result.

    bash benchmarks/gpu_overlay.sh          # here: DeepSpeed, transformers, ... into benchmarks/.gpu_overlay
    # on the GPU machine, carrying benchmarks/.gpu_overlay beside the repository:
    PYTHONPATH=benchmarks/.gpu_overlay:. python3 benchmarks/gpu_check.py --out $OUT/gpu-check.json
    # here, its CPU-capable parts (checks 1, 2 and 4 in fp32 over gloo; 3 and 5 skipped):
    PYTHONPATH=benchmarks/.gpu_overlay:. .venv/bin/python benchmarks/gpu_check.py --device cpu --out /tmp/gpu-check.json

1. learner_step: a tiny model (`make_tiny_model`, untrained) in a bf16 DeepSpeed `Learner`, at
   ZeRO-2 and then ZeRO-3 in the same process (a one-rank nccl world): the GRPO step's loss is
   finite and the weights move; seconds of the first and of a second step.
2. weight_source: `Learner.weight_source("bfloat16")`, vLLM's `WeightSource`: its metadata agrees
   with what iterating it yields (name, dtype, shape), the tensors are bf16 on the learner's
   device; at ZeRO-3 the allocated CUDA memory while iterating stays within two parameters (a
   gather and its release) of where it started, not a model copy above it; `staging.pack` of
   the tensors into two staging areas (the device-to-host copy) gives buckets holding exactly
   the tensors' bytes; GB/s of that pack, gathers included.
3. cuda_ipc: what vLLM's `ipc` backend does with `packed=True` (ipc_engine.py,
   packed_tensor.py): the weights are copied into one CUDA buffer per bucket, exported once
   with `reduce_tensor`; a spawned process on the same GPU rebuilds it with
   `rebuild_cuda_tensor` and clones each tensor out; its copies are bit-equal to the learner's
   (SHA-256 of each tensor's bytes); GB/s from the first copy to the last clone.
4. numerics: the learner's logprobs of the same sequences one at a time and as one padded batch
   of 8 (mean and max |Δ|); taking the one-at-a-time ones as the engine's, a step with
   `old_logprobs: learner` (and TIS) has its ratio at 1 within tolerance while
   `old_logprobs: engine` carries the gap into the ratio (the learner's step stats).
5. nccl_broadcast: needs a second GPU; printed as skipped.

The JSON goes to `--out` (the device's copy of the tree has no git history to stamp it with),
else through `common.write_result` into benchmarks/results/ (a clean git checkout with the
project's whole environment). The exit status is 1 when a check failed.

Assumes on the GPU machine: x86-64 Linux, CPython 3.11 or 3.12 (the overlay holds both builds
of its compiled packages; the GPU image's is 3.12), torch with CUDA (the image's is 2.11; any
2.x the pinned DeepSpeed and transformers accept), torch's own dependencies (on 3.12 they include
setuptools), numpy, which is too large to travel (see gpu_overlay.sh), and, as long as
rft_cluster/learner.py imports rft_cluster.storage at load, pyarrow; nothing else. The
overlay goes first on PYTHONPATH, so its pins shadow whatever the machine has.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import random
import shlex
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BUCKET_BYTES = 1 << 20  # small enough that the tiny model spans several buckets
SEQUENCES = 8
# |ratio - 1| allowed at a step's first minibatch with learner-recomputed old logprobs: the same
# kernels on the same shapes give the same logprobs; fp32 on CPU agrees to rounding.
RATIO_TOLERANCE = {"bfloat16": 1e-3, "float32": 1e-5}


@dataclass
class Check:
    name: str
    status: str = "ok"  # ok | FAILED | skipped
    figures: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def expect(self, condition: bool, problem: str) -> None:
        if not condition:
            self.status, self.problems = "FAILED", [*self.problems, problem]

    def line(self) -> str:
        figures = " ".join(f"{k}={_fmt(v)}" for k, v in self.figures.items())
        return f"[gpu-check] {self.name}: {self.status} {'; '.join(self.problems)} {figures}".replace("  ", " ").rstrip()

    def record(self) -> dict[str, Any]:
        return {"status": self.status, "problems": self.problems, **self.figures}


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def run_check(name: str, body: Callable[[Check], None], checks: list[Check]) -> Check:
    """Runs one check; an exception fails it (with its message) and the next check still runs."""
    check = Check(name)
    try:
        body(check)
    except Exception as e:  # noqa: BLE001 - reported as the check's failure
        traceback.print_exc()
        check.expect(False, f"{type(e).__name__}: {e}")
    print(check.line(), flush=True)
    checks.append(check)
    return check


# ---------------------------------------------------------------- the learner and its inputs


@dataclass
class Setup:
    model_dir: Path
    device: str  # "cuda" | "cpu"
    dtype: str  # the learner's: bfloat16 on a GPU, float32 on CPU (where the learner trains in fp32)

    def learner(self, zero_stage: int, old_logprobs: str = "learner", tis_cap: float | None = 2.0) -> Any:
        from rft_cluster.config import LearnerSpec
        from rft_cluster.learner import Learner

        spec = LearnerSpec(dtype=self.dtype, zero_stage=zero_stage, micro_batch_size=SEQUENCES)
        # Adam moves each weight by about the rate: 1e-2 shows in bf16 even on a norm weight of 1
        # (its spacing there is 2^-7), so "every tensor moved" holds in bf16 as in fp32.
        return Learner(str(self.model_dir), spec, 1e-2, 0.2, seed=0, old_logprobs=old_logprobs, tis_cap=tis_cap)


def sequences(vocab: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """(token ids, loss mask) of varied length: a prompt, then generated tokens."""
    rng = random.Random(seed)
    out = []
    for _ in range(SEQUENCES):
        prompt, generated = rng.randint(8, 24), rng.randint(16, 64)
        out.append(([rng.randrange(vocab) for _ in range(prompt + generated)], [0] * prompt + [1] * generated))
    return out


def samples(seqs: list[tuple[list[int], list[int]]], engine_logprobs: list[list[float]]) -> list[Any]:
    from rft_cluster.types import TrainSample

    return [TrainSample(ids, mask, [0.0, *lp], 1.0 if i % 2 else -1.0) for i, ((ids, mask), lp) in enumerate(zip(seqs, engine_logprobs))]


def free(learner: Any) -> None:
    """Drops a learner's memory before the next one is measured."""
    import torch

    del learner
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- 1 and 4: steps and numerics


def numerics_and_step(setup: Setup, stage: int, checks: list[Check]) -> Any:
    """Checks 4 (at ZeRO-2 only: its figures do not depend on the stage) and 1; returns the
    stepped learner for check 2."""
    learner = setup.learner(stage)
    seqs = sequences(len(learner.tokenizer))
    ids = [s for s, _ in seqs]
    single = [learner.compute_logprobs([s])[0] for s in ids]  # as an engine would: another batch shape
    batched = learner.compute_logprobs(ids)  # one padded batch of SEQUENCES
    batch = samples(seqs, single)

    if stage == 2:
        def numerics(check: Check) -> None:
            deltas = [abs(a - b) for x, y in zip(single, batched) for a, b in zip(x, y)]
            learner_stats = learner.train_step(batch)
            check.figures.update({
                "batch1_vs_batch8_mean_abs": sum(deltas) / len(deltas), "batch1_vs_batch8_max_abs": max(deltas),
                "mismatch_mean": learner_stats["mismatch_mean"], "mismatch_max": learner_stats["mismatch_max"],
                "tis_truncated": learner_stats["tis_truncated"], "ratio_dev_max_learner": learner_stats["ratio_dev_max"],
            })
            engine = setup.learner(stage, old_logprobs="engine", tis_cap=None)
            try:
                check.figures["ratio_dev_max_engine"] = engine.train_step(batch)["ratio_dev_max"]
            finally:
                free(engine)
            tolerance = RATIO_TOLERANCE[setup.dtype]
            check.expect(learner_stats["ratio_dev_max"] <= tolerance, f"learner-recomputed ratio off 1 by {learner_stats['ratio_dev_max']:.3g} > {tolerance:g}")
            if max(deltas) > 0:  # the gap the engine's logprobs carry into the ratio
                check.expect(check.figures["ratio_dev_max_engine"] > learner_stats["ratio_dev_max"], "engine logprobs' ratio no further off 1 than the learner's")

        run_check("numerics", numerics, checks)

    def step(check: Check) -> None:
        import torch

        before = dict(learner.named_weights())
        first = learner.train_step(batch)
        second = learner.train_step(batch)
        check.figures.update({"first_step_s": first["seconds"], "step_s": second["seconds"], "zero_stage": stage, "dtype": str(next(learner.model.parameters()).dtype),
                              "params": sum(t.numel() for t in before.values()), "loss": first["loss"], "grad_norm": first["grad_norm"]})
        after = dict(learner.named_weights())
        moved = sum(not torch.equal(before[n], after[n]) for n in before)
        check.figures["tensors_moved"] = f"{moved}/{len(before)}"
        check.expect(all(torch.isfinite(torch.tensor([s["loss"], s["grad_norm"]])).all() for s in (first, second)), "loss or grad norm not finite")
        check.expect(moved == len(before), "some weights did not move")

    run_check(f"learner_step_zero{stage}", step, checks)
    return learner


# ---------------------------------------------------------------- 2: the weight source and packing


def weight_source(learner: Any, setup: Setup, stage: int, checks: list[Check]) -> None:
    import torch

    from rft_cluster.staging import Mappings, Staging, pack, unflatten

    def body(check: Check) -> None:
        source = learner.weight_source("bfloat16")
        meta = source.metadata()
        largest = max(m.dtype.itemsize * _numel(m.shape) for m in meta)
        check.figures.update({"zero_stage": stage, "tensors": len(meta), "model_mb": source.nbytes() / 2**20, "largest_mb": largest / 2**20})
        cuda = setup.device == "cuda"
        if cuda:
            torch.cuda.synchronize()
            baseline = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        seen = 0
        for m, (name, t) in zip(meta, source, strict=True):
            check.expect((m.name, m.dtype, m.shape) == (name, t.dtype, tuple(t.shape)), f"{name}: metadata {m} but yields {t.dtype} {tuple(t.shape)}")
            check.expect(t.device.type == setup.device and t.dtype == torch.bfloat16, f"{name}: {t.dtype} on {t.device}")
            seen += t.numel() * t.element_size()
        check.expect(seen == source.nbytes(), f"iterated {seen} bytes, metadata says {source.nbytes()}")
        if cuda:
            over = torch.cuda.max_memory_allocated() - baseline
            check.figures["iter_peak_over_baseline_mb"] = over / 2**20
            if stage == 3:  # a gather and the bf16 copy of it at most, never the model
                check.expect(over <= 2 * largest + (2 << 20), f"iterating allocated {over / 2**20:.1f} MiB above the baseline")

        # The packed buckets hold exactly the tensors' bytes (checked as each bucket is made:
        # a bucket's area is reused two buckets later).
        reference = {n: t.to("cpu", copy=True) for n, t in source}
        areas, mappings, buckets, packed = [Staging(), Staging()], Mappings(), 0, 0
        for bucket in pack(source, areas, BUCKET_BYTES):
            buckets, packed = buckets + 1, packed + bucket.nbytes
            for name, view in unflatten(bucket.names, bucket.shapes, bucket.dtype_names, mappings.view(bucket.path, bucket.nbytes)):
                check.expect(torch.equal(view, reference[name]), f"{name}: packed bytes differ")
        check.expect(packed == source.nbytes(), f"packed {packed} bytes of {source.nbytes()}")
        t0 = time.perf_counter()
        for _ in pack(source, areas, BUCKET_BYTES):
            pass
        seconds = time.perf_counter() - t0
        check.figures.update({"buckets": buckets, "pack_s": seconds, "pack_gbps": packed / 1e9 / seconds})
        mappings.close()

    run_check(f"weight_source_zero{stage}", body, checks)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# ---------------------------------------------------------------- 3: CUDA IPC


def _ipc_consumer(conn: Any) -> None:
    """The engine's side in a spawned process: rebuilds the exported buffer once (vLLM's
    `PackedBufferImporter`), clones each bucket's tensors out before acknowledging it (the
    producer then overwrites the buffer), and at the end returns each tensor's digest."""
    import torch
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    torch.cuda.set_device(0)
    key, buffer, copies = None, None, {}
    while (msg := conn.recv()) is not None:
        args, names, shapes, dtype_names, sizes = msg
        if args != key:
            key, buffer = args, rebuild_cuda_tensor(*args)
        offset = 0
        for name, shape, dtype, size in zip(names, shapes, dtype_names, sizes):
            copies[name] = buffer[offset : offset + size].view(getattr(torch, dtype)).view(shape).clone()
            offset += size
        torch.cuda.synchronize()
        conn.send(True)
    conn.send({name: _digest(t) for name, t in copies.items()})
    del buffer


def _digest(t: Any) -> str:
    """SHA-256 of a tensor's bytes."""
    import torch

    return hashlib.sha256(t.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes()).hexdigest()


def cuda_ipc(learner: Any, checks: list[Check]) -> None:
    import torch
    import torch.multiprocessing as mp
    from torch.multiprocessing.reductions import reduce_tensor

    def body(check: Check) -> None:
        source = learner.weight_source("bfloat16")
        expected = {name: _digest(t) for name, t in source}
        largest = max(m.dtype.itemsize * _numel(m.shape) for m in source.metadata())
        buffer = torch.empty(max(BUCKET_BYTES, largest), dtype=torch.uint8, device="cuda")
        _, args = reduce_tensor(buffer)
        ours, theirs = mp.get_context("spawn").Pipe()
        child = mp.get_context("spawn").Process(target=_ipc_consumer, args=(theirs,), daemon=True)
        child.start()
        try:
            chunks, total = 0, 0
            packed: list[tuple[str, list[int], str, int]] = []  # (name, shape, dtype, bytes) in the buffer

            def send() -> None:
                torch.cuda.current_stream().synchronize()  # the consumer reads what the copies wrote
                ours.send((args, *(list(column) for column in zip(*packed))))
                ours.recv()

            t0 = time.perf_counter()
            for name, t in source:
                flat = t.contiguous().view(-1).view(torch.uint8)
                used = sum(size for *_, size in packed)
                if used + flat.numel() > buffer.numel():
                    send()
                    chunks, packed, used = chunks + 1, [], 0
                buffer[used : used + flat.numel()].copy_(flat)
                packed.append((name, list(t.shape), str(t.dtype).removeprefix("torch."), flat.numel()))
                total += flat.numel()
            send()
            seconds = time.perf_counter() - t0
            ours.send(None)
            received = ours.recv()
        finally:
            child.join(timeout=60)
            if child.is_alive():
                child.kill()
        torch.cuda.ipc_collect()
        differ = [n for n in expected if received.get(n) != expected[n]]
        check.figures.update({"tensors": len(expected), "chunks": chunks + 1, "mb": total / 2**20, "seconds": seconds, "gbps": total / 1e9 / seconds})
        check.expect(not differ and len(received) == len(expected), f"{len(differ)} tensors differ after IPC, e.g. {differ[:3]}")

    run_check("cuda_ipc", body, checks)


# ---------------------------------------------------------------- the run


def environment(device: str) -> dict[str, Any]:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu"}
    print(f"[gpu-check] python {env['python']} torch {env['torch']} cuda {env['cuda']} device {env['device']}", flush=True)
    return env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--stages", default="2,3", help="ZeRO stages to run the learner at, in one process")
    parser.add_argument("--out", type=Path, help="where the JSON goes; without it, benchmarks/results/gpu-check.json through write_result")
    args = parser.parse_args()
    stages = [int(s) for s in args.stages.split(",")]
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the learner picks CUDA whenever torch sees it
    # torch.distributed warns of its own deprecated calls in every ZeRO-3 gather DeepSpeed makes
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    t0 = time.perf_counter()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("[gpu-check] torch sees no CUDA device (use --device cpu for the CPU-capable checks)")
    env = environment(args.device)
    from rft_cluster.tiny_model import make_tiny_model

    checks: list[Check] = []
    with tempfile.TemporaryDirectory() as tmp:
        # A few M parameters, none a large share of them (a small vocabulary: the embedding is the largest).
        setup = Setup(make_tiny_model(Path(tmp) / "model", vocab_size=2048, num_layers=6, pretrain_steps=0), args.device,
                      "bfloat16" if args.device == "cuda" else "float32")
        for stage in stages:
            learner = numerics_and_step(setup, stage, checks)
            weight_source(learner, setup, stage, checks)
            if stage == stages[-1] and args.device == "cuda":
                cuda_ipc(learner, checks)
            free(learner)
    if args.device != "cuda":
        checks.append(Check("cuda_ipc", "skipped", {"reason": "needs CUDA"}))
        print(checks[-1].line())
    checks.append(Check("nccl_broadcast", "skipped", {"reason": "needs 2 GPUs"}))
    print(checks[-1].line())
    seconds = time.perf_counter() - t0
    failed = [c.name for c in checks if c.status == "FAILED"]
    print(f"[gpu-check] {len(checks) - len(failed)}/{len(checks)} not failed in {seconds:.0f} s" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    result = {"environment": env, "seconds": seconds, "checks": {c.name: c.record() for c in checks}}
    if args.out is None:
        from common import RESULTS, write_result

        write_result(RESULTS, "gpu-check.json", result)
    else:
        from common import versions  # benchmarks/common.py, beside this script

        result |= {"command": shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv]), "versions": versions(),
                   "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"[gpu-check] written to {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
