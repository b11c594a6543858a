"""The warehouse tool server and grader endpoint (`rft_cluster.envs.endpoints`): `/tool` serves
find_product, stock and warehouses on one URL, dispatching on the call's `name`; `/grade`
scores exact units."""

from __future__ import annotations

from typing import Any

from rft_cluster.config import EndpointGrader, ToolSpec
from rft_cluster.envs.endpoints import EnvServers
from rft_cluster.envs.warehouse import grading
from rft_cluster.envs.warehouse.catalog import make_catalog
from rft_cluster.envs.warehouse.tools import TOOL_NAMES, ToolError, WarehouseTools


class WarehouseServers(EnvServers):
    """Serves the catalogue of `seed` on 127.0.0.1 (a free port) from a background thread:
    `with WarehouseServers(seed) as env: ...`. `tools` is what the server calls."""

    def __init__(self, seed: int = 0, token: str | None = None, tool_delay_s: float = 0.0):
        self.tools = WarehouseTools(make_catalog(seed))
        super().__init__(self._call_tool, grading.score, token, tool_delay_s)

    def _call_tool(self, name: Any, arguments: Any) -> tuple[int, str]:
        try:
            return 200, self.tools.call(name, arguments)
        except ToolError as e:
            return e.status, e.message

    def tool_specs(self) -> list[ToolSpec]:
        return [ToolSpec(name=name, server_url=self.tool_url, headers=self.headers) for name in TOOL_NAMES]

    def grader_spec(self) -> EndpointGrader:
        return EndpointGrader(type="endpoint", name="warehouse", url=self.grader_url, headers=self.headers)
