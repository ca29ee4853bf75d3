"""What every Ray job works on: the workspace, the catalog and, for a multi-date catalog, one vintage.

Why one module: each job parsed ``--workspace``/``--catalog`` and loaded the catalog itself; with vintages a job
that skipped the date selection would prepare two dates of a city into one folder. The jobs take the same rule as
the CLI: a catalog holding several vintages needs ``--vintage``, and the workspace is scoped to it
(:meth:`engine.workspace.Workspace.with_vintage`).
"""

from __future__ import annotations

import argparse

import pyarrow as pa

from engine.catalog import find_catalog, load_catalog, select_cities, select_vintage
from engine.workspace import Workspace


def add_scope_args(parser: argparse.ArgumentParser, cities: bool = True) -> None:
    parser.add_argument("--workspace", default="geolink-data", help="folder or s3://bucket/prefix shared by every node")
    parser.add_argument("--catalog", default=None)
    parser.add_argument("--vintage", default=None, help="one date of a multi-date catalog (its `vintage` column)")
    if cities:
        parser.add_argument("--cities", default="all")


def load_scope(args: argparse.Namespace) -> tuple[Workspace, pa.Table]:
    """The workspace scoped to ``--vintage`` and the catalog rows of that date (and of ``--cities``).

    Raises:
        ValueError: a bad vintage name; CatalogError (a ValueError) for an unusable catalog, an unknown city or
            vintage, or several vintages without ``--vintage``.
    """
    workspace = Workspace.at(args.workspace).with_vintage(args.vintage)
    catalog = select_vintage(load_catalog(args.catalog or find_catalog(workspace)), args.vintage)
    if getattr(args, "cities", None):
        catalog = select_cities(catalog, args.cities)
    return workspace, catalog
