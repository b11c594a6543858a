"""The FinQA tool server and grader endpoint (`rft_cluster.envs.endpoints`): `/tool` serves
search, list and cat on one URL, dispatching on the call's `name`; `/grade` gives partial
credit; `/calls/{trace_id}` says what the server saw for one rollout, for the demo report.
"""

from __future__ import annotations

from pathlib import Path
from rft_cluster.envs.endpoints import EnvServers, tool_caller
from rft_cluster.envs.finqa import grading
from rft_cluster.envs.finqa.search import Backend
from rft_cluster.envs.finqa.tools import TOOL_NAMES, FinQATools


class FinQAServers(EnvServers):
    """Serves the corpus at `root` on 127.0.0.1 (a free port) from a background thread, so a
    synchronous driver can use it: `with FinQAServers(root) as env: ...`. `backend` picks the
    search ("bm25" forces the fallback). `tools` is the object the server calls: writing
    demonstrations with it gives outputs the server would give. `tool_delay_s` delays every
    tool call by that much (the regime of real, slow tools); demonstrations are not delayed."""

    def __init__(self, root: str | Path, token: str | None = None, backend: Backend = "auto", tool_delay_s: float = 0.0):
        self.tools = FinQATools(root, backend)
        super().__init__(tool_caller(self.tools.call), grading.score, TOOL_NAMES, "finqa", token, tool_delay_s)
