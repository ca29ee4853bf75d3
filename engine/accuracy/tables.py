"""The file-based entry point: ``geolink-engine assess-table --samples S.csv --strata T.csv --out R.json``.

Why a file interface: anyone can run the engine's estimators on their own stratified sample (from any map, any
software) and get the same numbers the engine reports. Files from outside are checked row by row before any
estimate is computed; every error names the file, the line and what to change.

``S.csv``: one row per sample unit, columns ``stratum,map_class,ref_class`` (other columns are ignored).
``T.csv``: one row per stratum, columns ``stratum,size`` (size in any unit: pixels, ha, m2; areas come out in it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from engine.accuracy.estimators import DEFAULT_INTERVAL, SAMPLE_COLUMNS, Z95, AccuracyResult, stratified_estimates
from engine.atomic import atomic_path

STRATA_COLUMNS = ("stratum", "size")


class AccuracyInputError(ValueError):
    """A samples or strata file that cannot be used; the message names the file, the line and what is wrong."""


def _read_csv(path: str | os.PathLike[str], columns: Sequence[str]) -> pd.DataFrame:
    """All cells as stripped text, indexed by line number in the file (header = line 1); blank lines dropped."""
    path = Path(path)
    if not path.is_file():
        raise AccuracyInputError(f"{path}: no such file")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skip_blank_lines=False, encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise AccuracyInputError(f"{path}: the file is empty; it needs a header line {','.join(columns)} "
                                 f"and one row per entry") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise AccuracyInputError(f"{path}: not a readable CSV file ({exc})") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise AccuracyInputError(f"{path}: line 1: missing column(s) {missing}; the header is {list(df.columns)}, "
                                 f"it needs {list(columns)}")
    df = df.apply(lambda col: col.str.strip())
    df.index = pd.RangeIndex(2, len(df) + 2, name="line")
    df = df[(df != "").any(axis=1)]
    if df.empty:
        raise AccuracyInputError(f"{path}: no rows after the header line")
    return df


def _first_bad(path: Path, bad: pd.Series, what: Callable[[int], str]) -> None:
    """Raise naming the first line where ``bad`` is true, ``what(line)`` and how many lines are affected."""
    if bad.any():
        lines = bad.index[bad.to_numpy()]
        more = f" ({len(lines)} lines like this)" if len(lines) > 1 else ""
        raise AccuracyInputError(f"{path}: line {lines[0]}: {what(lines[0])}{more}")


def read_samples_csv(path: str | os.PathLike[str], classes: Sequence[str] | None = None) -> pd.DataFrame:
    """Read and check ``S.csv``; the frame's index is each row's line number in the file.

    Args:
        path: the samples file (columns ``stratum,map_class,ref_class``; more are kept, as text).
        classes: the allowed class labels; ``None`` accepts any non-empty label.

    Raises:
        AccuracyInputError: missing file or columns, empty file, an empty cell or a class not in ``classes``.
    """
    path = Path(path)
    df = _read_csv(path, SAMPLE_COLUMNS)
    for column in SAMPLE_COLUMNS:
        _first_bad(path, df[column] == "", lambda line, c=column: f"{c} is empty")
    if classes is not None:
        allowed = [str(c) for c in classes]
        for column in ("map_class", "ref_class"):
            _first_bad(path, ~df[column].isin(allowed),
                       lambda line, c=column: f"{c} {df.loc[line, c]!r} is not one of the classes {allowed}")
    return df


def _read_strata(path: Path) -> pd.DataFrame:
    """``T.csv`` checked, as a frame indexed by line number with ``stratum`` (text) and ``size`` (float)."""
    df = _read_csv(path, STRATA_COLUMNS)
    _first_bad(path, df["stratum"] == "", lambda line: "stratum is empty")
    first_line = df.reset_index().groupby("stratum")["line"].transform("min").to_numpy()
    _first_bad(path, pd.Series(first_line != df.index.to_numpy(), index=df.index),
               lambda line: f"stratum {df.loc[line, 'stratum']!r} is listed again (first on line "
                            f"{df.index[(df['stratum'] == df.loc[line, 'stratum']).to_numpy()][0]}); "
                            f"give each stratum one row")
    size = pd.to_numeric(df["size"], errors="coerce")
    _first_bad(path, ~(np.isfinite(size) & (size > 0)),
               lambda line: f"size {df.loc[line, 'size']!r} of stratum {df.loc[line, 'stratum']!r} is not a "
                            f"number > 0 (a stratum's size in pixels, ha or m2)")
    return pd.DataFrame({"stratum": df["stratum"], "size": size.astype(float)})


def read_strata_csv(path: str | os.PathLike[str]) -> dict[str, float]:
    """Read and check ``T.csv`` into stratum -> size, in file order.

    Raises:
        AccuracyInputError: missing file or columns, empty file, an empty or repeated stratum, or a size that is
            not a number > 0.
    """
    df = _read_strata(Path(path))
    return dict(zip(df["stratum"], df["size"]))


def assess_table(samples_csv: str | os.PathLike[str], strata_csv: str | os.PathLike[str],
                 out_json: str | os.PathLike[str], *, classes: Sequence[str] | None = None, fpc: bool = True,
                 z: float = Z95, interval: str = DEFAULT_INTERVAL) -> AccuracyResult:
    """Estimate accuracy and areas from ``S.csv`` and ``T.csv`` (Stehman 2014) and write ``R.json`` atomically.

    Every stratum of ``T.csv`` must have samples (an unsampled stratum would bias every estimate: drop it from
    ``T.csv`` to estimate for the rest knowingly), and every sample's stratum must be in ``T.csv``. Strata with a
    single sample are accepted; ``R.json`` then notes them and warns that the standard errors are understated.

    Args:
        samples_csv, strata_csv: the input files (see the module docstring).
        out_json: where ``R.json`` goes (its folder is created).
        classes: allowed class labels in report order; default: the labels seen in the samples, sorted.
        fpc: finite population correction ``1 - n_h/N_h``, which reads each size as a count of sampling units
            (right for pixels; ~1 for m2; pass ``False`` for sizes in ha or km2).
        z: normal quantile of the confidence intervals.
        interval: ``jeffreys`` (default: the stratified Jeffreys posterior interval) or ``wald`` (estimate +- z SE,
            the classical intervals of Stehman 2014 and Olofsson et al. 2014).

    Returns:
        The :class:`AccuracyResult` that was written.

    Raises:
        AccuracyInputError: a bad file, naming the file and line.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "S.csv").write_text("stratum,map_class,ref_class\\na,uv,uv\\na,uv,other\\nb,other,other\\nb,other,uv\\n")
        >>> _ = (d / "T.csv").write_text("stratum,size\\na,100\\nb,900\\n")
        >>> assess_table(d / "S.csv", d / "T.csv", d / "R.json").overall_accuracy.estimate
        0.5
    """
    samples_csv, strata_csv = Path(samples_csv), Path(strata_csv)
    strata = _read_strata(strata_csv)
    samples = read_samples_csv(samples_csv, classes)
    _first_bad(samples_csv, ~samples["stratum"].isin(strata["stratum"]),
               lambda line: f"stratum {samples.loc[line, 'stratum']!r} is not in {strata_csv}; add it there with "
                            f"its size, or correct the label")
    n = samples["stratum"].value_counts().reindex(strata["stratum"], fill_value=0).to_numpy()
    n = pd.Series(n, index=strata.index)
    _first_bad(strata_csv, n == 0,
               lambda line: f"stratum {strata.loc[line, 'stratum']!r} has no samples in {samples_csv}; sample it, "
                            f"or drop it from {strata_csv.name} to estimate for the other strata only")
    if fpc:
        _first_bad(strata_csv, n > strata["size"],
                   lambda line: f"stratum {strata.loc[line, 'stratum']!r} has {n[line]} samples but size "
                                f"{strata.loc[line, 'size']:g}: with the finite population correction a size must "
                                f"count sampling units (pixels); give sizes in pixels or turn the correction off "
                                f"(--no-fpc)")
    sizes = dict(zip(strata["stratum"], strata["size"]))
    try:
        result = stratified_estimates(samples, sizes, classes=classes, fpc=fpc, z=z, interval=interval)
    except ValueError as exc:  # the checks above should leave none; keep the file names if one slips through
        raise AccuracyInputError(f"{samples_csv} with {strata_csv}: {exc}") from None
    with atomic_path(out_json) as tmp:
        tmp.write_text(json.dumps(result.to_json(), indent=2, allow_nan=False) + "\n")
    return result
