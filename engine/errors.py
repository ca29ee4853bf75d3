"""One line for an exception, with its root cause: what the ledger, the report and the console say about a failure.

Why: rasterio re-raises GDAL's error as ``RasterioIOError: Read failed. See previous exception for details.``, with
the useful part (``TIFFReadEncodedTile() failed``, the file and the block) only in the chained exception. A ledger
row or a report line must carry that cause, because nobody will find "the previous exception" later.
"""

from __future__ import annotations

import re

_UNINFORMATIVE = re.compile(r"see previous exception", re.IGNORECASE)


def describe_error(exc: BaseException, limit: int = 600) -> str:
    """``Type: message`` of ``exc``, followed by each chained cause (``__cause__``, else ``__context__``) that says
    something new, as ``<- Type: message``; one line, at most ``limit`` characters.

    Example:
        >>> try:
        ...     try:
        ...         raise OSError("TIFFReadEncodedTile() failed: x.tif, band 1")
        ...     except OSError as root:
        ...         raise IOError("Read failed. See previous exception for details.") from root
        ... except Exception as exc:
        ...     describe_error(exc)
        'OSError: TIFFReadEncodedTile() failed: x.tif, band 1'
    """
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        message = " ".join(str(current).split())
        if message and not _UNINFORMATIVE.search(message) and not any(message in p for p in parts):
            parts.append(f"{type(current).__name__}: {message}")
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    text = " <- ".join(parts) if parts else f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    return text if len(text) <= limit else text[: limit - 3] + "..."
