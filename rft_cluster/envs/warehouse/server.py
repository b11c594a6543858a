"""The warehouse tool server and grader endpoint (`rft_cluster.envs.endpoints`): `/tool` serves
find_product, stock and warehouses on one URL, dispatching on the call's `name`; `/grade`
scores exact units."""

from __future__ import annotations

from rft_cluster.envs.endpoints import EnvServers, tool_caller
from rft_cluster.envs.warehouse import grading
from rft_cluster.envs.warehouse.catalog import make_catalog
from rft_cluster.envs.warehouse.tools import TOOL_NAMES, WarehouseTools


class WarehouseServers(EnvServers):
    """Serves the catalogue of `seed` on 127.0.0.1 (a free port) from a background thread:
    `with WarehouseServers(seed) as env: ...`. `tools` is what the server calls."""

    def __init__(self, seed: int = 0, token: str | None = None, tool_delay_s: float = 0.0):
        self.tools = WarehouseTools(make_catalog(seed))
        super().__init__(tool_caller(self.tools.call), grading.score, TOOL_NAMES, "warehouse", token, tool_delay_s)
