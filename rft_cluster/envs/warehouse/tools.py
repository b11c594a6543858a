"""The three tools over a catalogue — `find_product`, `stock`, `warehouses` — as plain functions of
their JSON arguments. The server and the scripted demonstrations both call `WarehouseTools.call`,
so a demonstration's tool output is exactly what the server would answer.

A question needs two lookups combined: the product's SKU from its name (`find_product` lists the
closest names, the asked one among look-alikes), then that SKU's stock, whose output lists every
warehouse: the answer is the one line the question asks about.
"""

from __future__ import annotations

import json
from typing import Any

from rft_cluster.envs.endpoints import ToolError
from rft_cluster.envs.warehouse.catalog import WAREHOUSES, Product

MAX_MATCHES = 3


def _function(name: str, description: str, properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False},
        },
    }


TOOLS: list[dict[str, Any]] = [
    _function("find_product", f"Find products by name. Returns up to {MAX_MATCHES} SKUs with their names.",
              {"name": {"type": "string", "description": "product name, e.g. Compact Steel Hinge"}}),
    _function("stock", "Units on hand of one SKU in every warehouse.",
              {"sku": {"type": "string", "description": "e.g. SKU-40213"}}),
    _function("warehouses", "List the warehouses.", {}),
]
TOOL_NAMES = tuple(tool["function"]["name"] for tool in TOOLS)


class WarehouseTools:
    def __init__(self, catalog: list[Product]):
        self.catalog = catalog
        self.by_sku = {p.sku: p for p in catalog}

    def call(self, name: Any, arguments: Any) -> str:
        """The output of one call (`arguments` a JSON object string); raises ToolError for a
        call the tools refuse, malformed ones included."""
        try:
            args = json.loads(arguments) if arguments not in (None, "") else {}
        except (TypeError, ValueError):
            raise ToolError(400, "arguments must be a JSON object string") from None
        if not isinstance(args, dict):
            raise ToolError(400, "arguments must be a JSON object")
        if name == "find_product":
            query = args.get("name")
            if not isinstance(query, str) or not query.strip():
                raise ToolError(400, 'find_product needs {"name": "<product name>"}')
            return self.find_product(query)
        if name == "stock":
            sku = args.get("sku")
            if not isinstance(sku, str):
                raise ToolError(400, 'stock needs {"sku": "SKU-<number>"}')
            return self.stock(sku)
        if name == "warehouses":
            return "\n".join(WAREHOUSES)
        raise ToolError(400, f"unknown tool {name!r}; this server serves {', '.join(TOOL_NAMES)}")

    def matches(self, query: str) -> list[Product]:
        """Products sharing most words with the query, best first (ties by name)."""
        words = set(query.lower().split())
        scored = [(len(words & set(p.name.lower().split())), p) for p in self.catalog]
        ranked = sorted((s for s in scored if s[0] > 0), key=lambda s: (-s[0], s[1].name))
        return [p for _, p in ranked[:MAX_MATCHES]]

    def find_product(self, query: str) -> str:
        found = self.matches(query)
        if not found:
            raise ToolError(404, f"no product matches {query!r}")
        return "\n".join(f"{p.sku} {p.name}" for p in found)

    def stock(self, sku: str) -> str:
        product = self.by_sku.get(sku.strip())
        if product is None:
            raise ToolError(404, f"no such SKU: {sku!r}")
        return "\n".join([f"{product.sku} {product.name}"] + [f"{w}: {n}" for w, n in product.stock.items()])
