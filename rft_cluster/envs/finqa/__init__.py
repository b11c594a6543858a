"""The FinQA demo environment (README "The demo"): ~2,800 generated quarterly reports in a directory tree,
a tool server with `search` (semantic, or BM25), `list` and `cat` over them, a partial-credit
grader endpoint, numeric questions as OpenAI-format datasets, and wasteful scripted
demonstrations for the supervised warm start.

    reports = generate_reports(seed)
    write_corpus(root, reports)
    splits = split_questions(reports, seed)
    write_datasets(data_dir, splits)
    with FinQAServers(root) as env:
        write_demonstrations(data_dir / "sft.jsonl", env.tools, splits.demo[:256], seed)
        ...  # env.tool_specs(), env.grader_spec() go into the job
"""

from rft_cluster.envs.finqa.corpus import Report, generate_reports, write_corpus
from rft_cluster.envs.finqa.grading import score
from rft_cluster.envs.finqa.server import FinQAServers
from rft_cluster.envs.finqa.tasks import (
    SYSTEM_PROMPT,
    Question,
    Splits,
    split_questions,
    write_datasets,
    write_demonstrations,
)
from rft_cluster.envs.finqa.tools import TOOLS, FinQATools, ToolError

__all__ = [
    "SYSTEM_PROMPT",
    "TOOLS",
    "FinQAServers",
    "FinQATools",
    "Question",
    "Report",
    "Splits",
    "ToolError",
    "generate_reports",
    "score",
    "split_questions",
    "write_corpus",
    "write_datasets",
    "write_demonstrations",
]
