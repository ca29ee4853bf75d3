"""docs/PRODUCTS.md is the products' data dictionary: every column of every product file is documented there."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.morphology import ROW_KEYS
from engine.products.regions import REGION_COLUMNS
from engine.schema import CITY_STATS_COLUMNS, POPULATION_COLUMNS, URBAN_VILLAGES_SCHEMA, UV_POPULATION_SCHEMA, embeddings_schema

DOC = (Path(__file__).resolve().parents[1] / "docs" / "PRODUCTS.md").read_text()


def _section(title: str) -> str:
    start = DOC.index(title)
    end = DOC.find("\n## ", start + 1)
    return DOC[start:end if end > 0 else None]


@pytest.mark.parametrize(("title", "columns"), [
    ("## `urban_villages.parquet`", URBAN_VILLAGES_SCHEMA.names),
    ("## `city_stats.csv`", CITY_STATS_COLUMNS),
    ("## `morphology.csv`", ROW_KEYS),
    ("## `regions.csv`", REGION_COLUMNS),
    *[("## `embeddings/<mode>_<level>.parquet`", embeddings_schema(8, level).names) for level in ("tile", "patch", "points")],
    ("## Population (`map --population-model DIR`)", POPULATION_COLUMNS),
    ("## Population (`map --population-model DIR`)", UV_POPULATION_SCHEMA.names),
])
def test_every_product_column_is_in_the_dictionary(title, columns):
    section = _section(title)
    missing = [name for name in columns if f"`{name}`" not in section]
    assert not missing, f"docs/PRODUCTS.md {title}: document {missing}"
