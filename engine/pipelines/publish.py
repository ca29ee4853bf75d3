"""Publishing a run's products: the preview page and the STAC collection, then (remote workspace) the upload.

Shared by `map`, `stitch`, `assess` and `merge-runs`, each of which ends with the same publish step.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa

from engine.errors import describe_error
from engine.product_layout import MAP_HTML
from engine.workspace import Workspace

log = logging.getLogger("engine.publish")


def publish_products(products: Path, catalog: pa.Table) -> None:
    """The regional table, the web map, the preview page (which links the map), then the STAC collection (which
    lists the pages, their pictures and the tables), validated offline."""
    from engine.products.page import write_page
    from engine.products.regions import write_regions
    from engine.products.stac import validate_stac, write_stac
    from engine.products.webmap import write_web_map

    write_regions(products)  # first: the pages and the STAC list it
    rows = catalog.to_pylist()
    try:
        write_web_map(products, rows)
    except Exception as exc:  # noqa: BLE001 (the map is a view of the products: without it they all still stand)
        (products / MAP_HTML).unlink(missing_ok=True)  # no stale map of an earlier pass
        log.warning("warning: the interactive map of %s was not written (%s); the products and index.html are complete",
                    products, describe_error(exc))
    write_page(products, rows, link_stac=True)
    write_stac(products)
    validate_stac(products)
    Workspace.publish(products)  # a remote workspace: everything under products/<run>/, last
