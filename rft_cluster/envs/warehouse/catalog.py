"""The warehouse world: a seeded catalogue of products (name, SKU) and their stock in each of
eight warehouses. The same seed gives the same world, so datasets written earlier match a
server started later."""

from __future__ import annotations

import random
from dataclasses import dataclass

WAREHOUSES = ("Denver", "Reno", "Austin", "Boise", "Tulsa", "Omaha", "Fresno", "Tampa")
_STYLES = ("Compact", "Heavy", "Slim", "Coated", "Large", "Mini", "Sealed", "Folding", "Rugged", "Quiet", "Long")
_MATERIALS = ("Steel", "Brass", "Nylon", "Oak", "Copper", "Rubber", "Glass", "Cedar")
_ITEMS = ("Hinge", "Bracket", "Valve", "Hose", "Clamp", "Shelf", "Pulley", "Gasket", "Lantern", "Ladder", "Crate", "Funnel")
N_PRODUCTS = 560


@dataclass(frozen=True)
class Product:
    sku: str
    name: str
    stock: dict[str, int]  # warehouse -> units on hand


def make_catalog(seed: int, n_products: int = N_PRODUCTS) -> list[Product]:
    """`n_products` distinct names (style, material, item), each with a unique SKU and a stock
    level per warehouse, in a seeded order."""
    combos = [f"{s} {m} {i}" for s in _STYLES for m in _MATERIALS for i in _ITEMS]
    if n_products > len(combos):
        raise ValueError(f"n_products must be at most {len(combos)}")
    rng = random.Random(f"warehouse-catalog-{seed}")
    names = rng.sample(combos, n_products)
    skus = rng.sample(range(10_000, 100_000), n_products)
    return [Product(f"SKU-{sku}", name, {w: rng.randint(0, 999) for w in WAREHOUSES}) for sku, name in zip(skus, names)]
