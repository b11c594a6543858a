"""Supervised warm start on demonstration conversations, with the RL learner's own stack.

Demonstrations are OpenAI-format conversations (`messages` with assistant tool calls and tool
results, plus `tools`). They are laid out as token ids exactly as rollouts are (`ChatCodec.
conversation_ids`), so what the policy learns here is what it will sample later.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from rft_cluster.chat import ChatCodec
from rft_cluster.config import LearnerSpec
from rft_cluster.learner import Learner
from rft_cluster.storage import RunStorage
from rft_cluster.types import TrainSample


def load_demonstrations(path: Path, codec: ChatCodec) -> list[TrainSample]:
    samples = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            ids, mask = codec.conversation_ids(row["messages"], row.get("tools"))
        except (json.JSONDecodeError, KeyError, ValueError) as e:
            raise ValueError(f"{path}:{n}: not a usable demonstration: {e}") from None
        samples.append(TrainSample(ids, mask, rollout_logprobs=[], advantage=0.0))
    if not samples:
        raise ValueError(f"{path}: no demonstrations")
    return samples


def epoch_batches(lengths: list[int], batch_size: int, shuffle: torch.Generator) -> list[list[int]]:
    """One epoch's batches of sample indices: a fresh shuffle, cut into batches of similar length.
    A batch is padded to its longest sample: random batches of the demo's demonstrations are 21 %
    padding, these 3 % (benchmarks/sft_batching.py)."""
    from transformers.trainer_pt_utils import get_length_grouped_indices

    order = get_length_grouped_indices(lengths, batch_size, generator=shuffle)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def padding_fraction(lengths: list[int], batches: list[list[int]]) -> float:
    """The share of padding in what these batches compute: each is padded to its longest sample."""
    return 1 - sum(lengths) / sum(len(b) * max(lengths[i] for i in b) for b in batches)


def sft(
    model: str,
    demonstrations: Path,
    output: Path,
    *,
    epochs: int = 3,
    batch_size: int = 8,
    learning_rate: float = 1e-3,
    spec: LearnerSpec | None = None,
    seed: int = 0,
    console: Console | None = None,
) -> dict[str, float]:
    """Trains `model` on the demonstrations and saves an HF model directory to `output`.
    Returns the first and last epoch's mean loss."""
    console = console or Console()
    spec = spec or LearnerSpec(micro_batch_size=batch_size)
    samples = load_demonstrations(demonstrations, ChatCodec.for_model(model))
    learner = Learner(model, spec, learning_rate, clip_epsilon=0.2, seed=seed)
    lengths = [len(s.token_ids) for s in samples]
    shuffle = torch.Generator().manual_seed(seed)
    epoch_losses = []
    t0 = time.perf_counter()
    n_batches = -(-len(samples) // batch_size)
    report_every = max(1, n_batches // 5)  # an epoch can take minutes on CPU: show it moving
    # A terminal shows it moving on a bar (running loss, ETA over every epoch); a plain console
    # (CI logs, files), which a bar would only reach once at its end, gets a line now and then.
    with Progress(*Progress.get_default_columns(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.fields[loss]}"),
                  console=console, disable=not console.is_terminal) as bar:
        task = bar.add_task("sft", total=epochs * n_batches, loss="")
        for epoch in range(1, epochs + 1):
            losses = []
            for n, batch in enumerate(epoch_batches(lengths, batch_size, shuffle), start=1):
                losses.append(learner.sft_step([samples[i] for i in batch])["loss"])
                recent = sum(losses[-report_every:]) / len(losses[-report_every:])
                bar.update(task, advance=1, description=f"sft epoch {epoch}/{epochs}", loss=f"loss {recent:.4f}")
                if bar.disable and n % report_every == 0 and n < n_batches:
                    console.print(f"[sft] epoch {epoch}/{epochs}: batch {n}/{n_batches}, loss {recent:.4f} "
                                  f"({time.perf_counter() - t0:.0f} s)", markup=False)
            epoch_losses.append(sum(losses) / len(losses))
            console.print(f"[sft] epoch {epoch}/{epochs}: loss {epoch_losses[-1]:.4f} ({time.perf_counter() - t0:.0f} s)", markup=False)
    learner.save_hf(RunStorage(output), "")
    console.print(f"[sft] warm-started model saved to {output}", markup=False)
    return {"first_epoch_loss": epoch_losses[0], "last_epoch_loss": epoch_losses[-1]}
