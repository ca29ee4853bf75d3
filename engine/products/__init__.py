"""Publishing a run's products (``products/<run>/``, read back from disk after stitching).

- :func:`write_stac` / :func:`validate_stac`: a self-contained STAC 1.1 Collection with one Item per city,
  validated offline against bundled schemas.
- :func:`write_page`: a static offline ``index.html`` with a summary table and one picture per city.
"""

from engine.products.page import write_page
from engine.products.stac import (
    OfflineSTACValidator,
    STACProductsError,
    validate_stac,
    write_stac,
)

__all__ = ["OfflineSTACValidator", "STACProductsError", "validate_stac", "write_page", "write_stac"]
