from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from rft_cluster.report import (
    TABLE_METRICS,
    baseline_and_final,
    load_metrics,
    plot_runs,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def valid(reward: float, calls: float, bigram: float | None, latency: float,
          tokens: float) -> dict:
    return {
        "valid_reward_mean": reward, "valid_shaped_reward_mean": reward - 0.05,
        "valid_tool_calls_per_rollout": calls, "valid_repeated_tool_bigram_fraction": bigram,
        "valid_rollout_latency_mean_s": latency, "valid_generated_tokens_mean": tokens,
        "valid_rollouts": 8.0, "valid_status/ok": 8.0,
    }


def train(reward: float | None, calls: float, latency: float) -> dict:
    return {
        "train_reward_mean": reward, "train_tool_calls_per_rollout": calls,
        "train_rollout_latency_mean_s": latency, "train_rollouts": 16.0,
        "timing.step.full_iteration": 30.0,
    }


def write_run(run_dir: Path, lines: list[dict]) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return run_dir


# Seed 1 was resumed: steps 2 and 3 were logged, then logged again; the later lines win.
SEED1 = [
    {"step": 0, **valid(0.2, 1.0, 0.5, 10.0, 100.0)},
    {"step": 1, **train(None, 1.5, 9.0)},  # a null: no rollout scored
    {"step": 2, **train(0.3, 1.6, 8.5), **valid(0.11, 9.0, 0.9, 99.0, 999.0)},
    {"step": 3, **train(0.2, 1.1, 7.0), **valid(0.99, 9.0, 0.9, 99.0, 999.0)},
    {"step": 2, **train(0.35, 1.7, 8.0), **valid(0.45, 1.8, 0.4, 7.5, 90.0)},
    {"step": 3, **train(0.5, 1.9, 6.5), **valid(0.6, 2.0, 0.25, 6.0, 80.0)},
]
# Seed 2: no consecutive calls at step 0, so no bigram fraction (null).
SEED2 = [
    {"step": 0, **valid(0.4, 2.0, None, 12.0, 120.0)},
    {"step": 1, **train(0.5, 2.1, 11.0)},
    {"step": 2, **train(0.6, 2.5, 10.0)},
    {"step": 3, **train(0.8, 2.9, 9.0), **valid(0.9, 3.0, 0.5, 8.0, 90.0)},
]


@pytest.fixture
def runs(tmp_path: Path) -> dict[str, list[dict]]:
    return {
        "seed 1": load_metrics(write_run(tmp_path / "s1", SEED1)),
        "seed 2": load_metrics(write_run(tmp_path / "s2", SEED2)),
    }


def sample_sd(xs: list[float]) -> float:
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def table_row(text: str, label: str) -> list[str]:
    [line] = [x for x in text.splitlines() if x.startswith(f"| {label} |")]
    return [c.strip() for c in line.strip("|").split("|")]


def test_load_metrics_keeps_last_line_per_step_sorted(runs):
    seed1 = runs["seed 1"]
    assert [r["step"] for r in seed1] == [0, 1, 2, 3]
    assert seed1[2]["valid_reward_mean"] == 0.45 and seed1[2]["train_reward_mean"] == 0.35
    assert seed1[3]["valid_reward_mean"] == 0.6
    assert seed1[1]["train_reward_mean"] is None


def test_baseline_and_final(runs):
    baseline, final = baseline_and_final(runs["seed 1"])
    assert set(baseline) == set(final) == set(TABLE_METRICS) == {
        "valid_reward_mean", "tool_calls_per_rollout", "repeated_tool_bigram_fraction",
        "rollout_latency_s", "tokens_per_rollout",
    }
    assert baseline == {"valid_reward_mean": 0.2, "tool_calls_per_rollout": 1.0,
                        "repeated_tool_bigram_fraction": 0.5, "rollout_latency_s": 10.0,
                        "tokens_per_rollout": 100.0}
    assert final == {"valid_reward_mean": 0.6, "tool_calls_per_rollout": 2.0,
                     "repeated_tool_bigram_fraction": 0.25, "rollout_latency_s": 6.0,
                     "tokens_per_rollout": 80.0}
    baseline, final = baseline_and_final(runs["seed 2"])
    assert baseline["repeated_tool_bigram_fraction"] is None
    assert (baseline["valid_reward_mean"], final["valid_reward_mean"]) == (0.4, 0.9)


def test_fewer_than_two_evaluations_raise(tmp_path: Path):
    records = load_metrics(write_run(tmp_path / "s3", [
        {"step": 0, **valid(0.2, 1.0, 0.5, 10.0, 100.0)},
        {"step": 1, **train(0.3, 1.0, 9.0)},
        {"step": 2, **train(0.4, 1.0, 9.0), "valid_reward_mean": None},
    ]))
    with pytest.raises(ValueError, match="seed 3: 1 evaluation"):
        baseline_and_final(records, name="seed 3")
    with pytest.raises(ValueError, match="seed 3"):
        write_report({"seed 3": records}, tmp_path / "report", title="t")
    assert not (tmp_path / "report" / "report.md").exists()


def test_bad_json_names_file_and_line(tmp_path: Path):
    run = write_run(tmp_path / "bad", SEED2[:2])
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 2, "train_reward_mean": \n')
    with pytest.raises(ValueError, match=f"{run / 'metrics.jsonl'}:3: invalid JSON"):
        load_metrics(run)
    (run / "metrics.jsonl").write_text('{"step": 0}\n[1, 2]\n')
    with pytest.raises(ValueError, match=f"{run / 'metrics.jsonl'}:2:"):
        load_metrics(run)
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        load_metrics(tmp_path / "nowhere")


def test_report_table_and_summary(runs, tmp_path: Path):
    out = tmp_path / "report"
    summary = write_report(runs, out, title="FinQA 2 seeds", preamble="Some context.",
                           extra={"commit": "abc123", "wall_s": 12.5})
    text = (out / "report.md").read_text()
    assert text.startswith("# FinQA 2 seeds\n\nSome context.")

    # Expected figures, from the numbers above (pairs are (seed 1, seed 2)).
    def mean_sd(xs: list[float], spec: str, sign: str = "") -> str:
        return f"{format(sum(xs) / len(xs), sign + spec)} ± {format(sample_sd(xs), spec)}"

    assert table_row(text, "valid reward mean") == [
        "valid reward mean", mean_sd([0.2, 0.4], ".3f"), mean_sd([0.6, 0.9], ".3f"),
        mean_sd([0.6 - 0.2, 0.9 - 0.4], ".3f", "+"), "+150.0%",
    ]
    assert table_row(text, "valid reward mean")[1:4] == [
        "0.300 ± 0.141", "0.750 ± 0.212", "+0.450 ± 0.071"]
    assert table_row(text, "rollout latency (s)") == [
        "rollout latency (s)", "11.00 ± 1.41", "7.00 ± 1.41", "-4.00 ± 0.00",
        f"{-4 / 11 * 100:+.1f}%",
    ]
    # Seed 2 has no baseline bigram fraction: baseline from one run, change from seed 1 only.
    assert table_row(text, "repeated tool bigram fraction") == [
        "repeated tool bigram fraction", "0.500 ± 0", mean_sd([0.25, 0.5], ".3f"),
        "-0.250 ± 0", "-50.0%",
    ]
    assert table_row(text, "seed 1")[:3] == ["seed 1", "3", "0.200 → 0.600"]
    # Per-step table: the resumed step's last line, the null shown as a dash.
    assert "| 1 | — | — | 1.50 | — | 9.00 | — |" in text
    assert "| 3 | 0.500 | 0.600 | 1.90 | 2.00 | 6.50 | 6.00 |" in text
    assert "0.990" not in text and "0.110" not in text
    for name in ("reward", "tool_calls", "latency"):
        assert f"![{name}]({name}.png)" in text

    json.dumps(summary)  # the caller writes it as JSON
    assert summary["commit"] == "abc123" and summary["wall_s"] == 12.5
    assert [s["seed"] for s in summary["seeds"]] == ["seed 1", "seed 2"]
    assert summary["seeds"][1]["final"]["tokens_per_rollout"] == 90.0
    mean = summary["mean"]
    assert mean["baseline"]["valid_reward_mean"]["mean"] == pytest.approx(0.3)
    assert mean["baseline"]["valid_reward_mean"]["sd"] == pytest.approx(math.sqrt(0.02))
    assert mean["final"]["tokens_per_rollout"]["mean"] == pytest.approx(85.0)
    assert mean["change"]["tokens_per_rollout"]["mean"] == pytest.approx(-25.0)
    assert mean["change"]["valid_reward_mean"]["relative"] == pytest.approx(1.5)

    with pytest.raises(ValueError, match="seeds"):
        write_report(runs, out, title="t", extra={"seeds": []})


def test_the_report_says_step_0_ran_on_warmed_engines_only_when_every_run_logged_it(tmp_path: Path):
    warmed = [{**SEED2[0], "timing.warmup": 4.5}, *SEED2[1:]]
    one = load_metrics(write_run(tmp_path / "w1", warmed))
    write_report({"seed 2": one}, tmp_path / "a", title="t")
    assert "one warm-up group that was not stored (4.5–4.5 s)" in (tmp_path / "a" / "report.md").read_text()
    # A run logged before warm-ups existed: the report claims nothing for the set.
    write_report({"seed 2": one, "old": load_metrics(write_run(tmp_path / "w2", SEED2))}, tmp_path / "b", title="t")
    assert "warm-up" not in (tmp_path / "b" / "report.md").read_text()


def test_single_run_shows_zero_sd(runs, tmp_path: Path):
    summary = write_report({"seed 1": runs["seed 1"]}, tmp_path, title="one")
    row = table_row((tmp_path / "report.md").read_text(), "valid reward mean")
    assert row[1:4] == ["0.200 ± 0", "0.600 ± 0", "+0.400 ± 0"]
    assert summary["mean"]["final"]["valid_reward_mean"] == {"mean": 0.6, "sd": 0.0, "n": 1}


def colour_pixels(png: Path, hex_colour: str) -> int:
    """Pixels within a small distance of the colour (anti-aliased edges are not)."""
    import matplotlib.image
    import numpy as np

    rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)]) / 255
    image = matplotlib.image.imread(png)[..., :3]
    return int((np.abs(image - rgb).max(axis=-1) < 0.02).sum())


def test_plots_are_pngs_with_one_colour_per_run(runs, tmp_path: Path):
    paths = plot_runs(runs, tmp_path)
    assert [p.name for p in paths] == ["reward.png", "tool_calls.png", "latency.png"]
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        assert len(data) > 10_000
        # Matplotlib's first two cycle colours, C0 and C1: both runs were drawn.
        assert colour_pixels(path, "#1f77b4") > 50, path
        assert colour_pixels(path, "#ff7f0e") > 50, path
