"""Per-grade latency of the python grader (its sandbox included): sequential grades of a trivial
`grade()`, so the figure is the fixed cost each rollout's grade pays, not the user's code."""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

from rft_cluster.config import PythonGrader
from rft_cluster.graders.python import Python

SOURCE = "def grade(sample, item):\n    return float(item['answer'] in sample['output_text'])\n"


async def _latencies(grades: int) -> list[float]:
    grader = Python(PythonGrader(type="python", source=SOURCE))
    latencies = []
    for _ in range(grades):
        started = time.perf_counter()
        result = await grader.grade({"output_text": "42"}, {"answer": "42"}, "trace_bench")
        latencies.append(time.perf_counter() - started)
        assert result.score == 1.0, result.error
    return latencies


def run(grades: int = 50) -> dict[str, Any]:
    latencies = sorted(asyncio.run(_latencies(grades)))
    return {
        "python_grader": {
            "grades": grades,
            "latency_ms_median": round(statistics.median(latencies) * 1000, 1),
            "latency_ms_p90": round(latencies[int(0.9 * (grades - 1))] * 1000, 1),
        }
    }


if __name__ == "__main__":
    from benchmarks.common import RESULTS, metadata, write_result

    write_result(RESULTS, "python_grader.json", {**run(), "metadata": metadata()})
