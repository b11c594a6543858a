"""The warehouse helpdesk: a second embedded environment, of another shape than FinQA. A seeded
catalogue of 560 products stocked in eight warehouses; a tool server with `find_product` (name
-> the closest SKUs), `stock` (SKU -> units in every warehouse: the asked line must be picked
out) and `warehouses`; an exact-units grader endpoint; questions as OpenAI-format datasets; and
wasteful scripted demonstrations (~5 calls each). `benchmarks/own_domain.py` runs the README's
own-domain workflow on it.

    catalog = make_catalog(seed)
    splits = split_questions(catalog, seed)
    write_datasets(data_dir, splits)
    with WarehouseServers(seed) as env:
        write_demonstrations(data_dir / "sft.jsonl", env.tools, splits.demo[:300], seed)
"""

from rft_cluster.envs.warehouse.catalog import WAREHOUSES, Product, make_catalog
from rft_cluster.envs.warehouse.grading import score
from rft_cluster.envs.warehouse.server import WarehouseServers
from rft_cluster.envs.warehouse.tasks import SYSTEM_PROMPT, Question, Splits, split_questions, write_datasets, write_demonstrations
from rft_cluster.envs.warehouse.tools import TOOLS, ToolError, WarehouseTools

__all__ = [
    "SYSTEM_PROMPT",
    "TOOLS",
    "WAREHOUSES",
    "Product",
    "Question",
    "Splits",
    "ToolError",
    "WarehouseServers",
    "WarehouseTools",
    "make_catalog",
    "score",
    "split_questions",
    "write_datasets",
    "write_demonstrations",
]
