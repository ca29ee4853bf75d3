"""`geolink-engine label`: a local web app to label a run's accuracy sample, blind to the map, by one or two people.

The accuracy stage draws a stratified random sample of points and, where no catalog reference labels them, asks
people for the reference class of each (``samples_to_label.csv``). Filling that CSV by hand is slow and error-prone;
this app shows each point on its image chip beside a four times wider context view, takes a class by key or click,
and saves every answer at once. What it is built around:

- **Blind.** The browser gets a point's ``id``, ``city``, ``lon`` and ``lat`` only: never its map class, stratum,
  catalog reference or region (a region whose strata are known could hint at the map), so no label is anchored on
  the map. The ids are in a random order already (:func:`engine.accuracy.sampling.draw_sample`).
- **Nothing lost.** Each answer is written into ``products/<run>/accuracy/labels/<labeller>.csv`` before the
  request is answered: a temporary file renamed over the old one (:func:`engine.atomic.atomic_path`), under a
  thread lock and an advisory file lock (two servers on one run stay safe). A reload, a closed tab or a killed
  server loses nothing, and the page resumes at the first unlabelled point.
- **Two labellers.** Each name (one :func:`engine.workspace.check_name` slug) has its own file; their agreement is
  Cohen's kappa with a 95% posterior interval that never has zero width (:func:`kappa_interval`).
- **The file ``assess`` reads.** :func:`export_reference` writes ``labels/<labeller>.reference.csv``
  (``id,city,lon,lat,label,unsure,comment``), checked with :func:`engine.accuracy.reference.read_labels` before it
  replaces the old one, for ``geolink-engine assess --reference``. (A dot in the name: no labeller's own file can
  have it, since names are slugs.)
- **One run's labels only.** The only files written are under that run's ``accuracy/labels/``; names are slugs
  and ids come from the sample, so no request can name another path.
- **Map runs and change runs.** A map run's points take a land class (``urban_village``, ``built_up``, ``other``);
  a change run's (``run.json`` ``"kind": "change"``, sample from :func:`engine.accuracy.change.run_change_assess`)
  take a change class (``other``, ``persistent_uv``, ``demolished_uv``, ``new_uv``) and the page shows the before
  and the after date side by side, each chip and context view captioned with its vintage. Labels, kappa (over the
  run's classes) and the export work the same way; the export of a change run is what
  ``run_change_assess(..., reference_labels=...)`` reads.

HTTP API (JSON, errors as ``{"error": "<one line>"}`` with 400 for a bad request, 409 for a labels file that does
not belong to this sample, 413 for a body over 16 KB, 415 for a body that is not JSON):

- ``GET /`` the page (``engine/web/static/label.html``, ``label.js``, ``label.css``; nothing from outside).
- ``GET /api/samples`` ``{run, kind, vintages, version, classes, keys, buttons, default_labeller,
  points: [{id, city, lon, lat, note}]}`` (``kind`` ``map`` or ``change``; ``vintages`` ``[before, after]`` of a
  change run, else null; ``buttons`` ``[{class, name, short, keys, help}]`` in key order).
- ``GET /api/labellers`` ``{labellers: [{name, labelled}]}``.
- ``GET /api/labels?labeller=NAME`` ``{labeller, answers: {id: answer}, labelled, total, first_unlabelled}``.
- ``POST /api/labels`` ``{labeller, id, label, unsure, comment[, version]}`` -> ``{answer, labelled, total}``.
- ``GET /api/agreement?a=NAME&b=NAME`` see :meth:`LabelStore.agreement`.
- ``POST /api/export`` ``{labeller}`` -> ``{path, rows}`` (every point labelled, else 400).
- ``GET /chip/<id>.png``, ``GET /context/<id>.png`` the imagery around the point, rendered on first request (a
  change run: the before date's); ``GET /chip-after/<id>.png``, ``GET /context-after/<id>.png`` a change run's
  after date.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import textwrap
import threading
import urllib.parse
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pyogrio
import rasterio
from PIL import Image, ImageDraw
from pyproj import CRS, Transformer

from engine.accuracy.estimators import POSTERIOR_DRAWS, POSTERIOR_SEED
from engine.accuracy.reference import LONLAT_TOLERANCE_DEG, read_labels, render_chip
from engine.accuracy.report import SAMPLES_GPKG, SAMPLES_LAYER
from engine.accuracy.sampling import BUILT_UP, LAND_CLASSES, OTHER_CLASS, UV_CLASS
from engine.atomic import atomic_path
from engine.change.codes import CHANGE_CLASSES
from engine.product_layout import ACCURACY_DIR, RUN_JSON
from engine.web.server import (
    CSP,
    LOCAL_HOSTS,
    StaticHandler,
    is_local_host,
    make_server,
)
from engine.workspace import check_name

try:  # advisory locks between processes (two `label` servers on one run); POSIX only
    import fcntl
except ImportError:  # pragma: no cover (Windows: the thread lock still guards one server)
    fcntl = None

log = logging.getLogger("engine.web")

STATIC_DIR = Path(__file__).resolve().parent / "static"
PAGE = "label.html"
LABELS_DIR = "labels"  # under products/<run>/accuracy/
REFERENCE_SUFFIX = ".reference.csv"  # export name: <labeller>.reference.csv (never a labeller's own file: no dots)
LOCK_NAME = ".lock"
LABEL_COLUMNS = ("id", "city", "lon", "lat", "label", "unsure", "comment", "labelled_at")
REFERENCE_COLUMNS = ("id", "city", "lon", "lat", "label", "unsure", "comment")
POINT_COLUMNS = ("id", "city", "lon", "lat")  # all the browser ever learns of a point
CLASS_KEYS = {UV_CLASS: ("1", "u"), BUILT_UP: ("2", "b"), OTHER_CLASS: ("3", "o")}
CHANGE_OTHER, PERSISTENT_UV, DEMOLISHED_UV, NEW_UV = CHANGE_CLASSES
CHANGE_KEYS = {CHANGE_OTHER: ("1", "o"), PERSISTENT_UV: ("2", "p"), DEMOLISHED_UV: ("3", "d"), NEW_UV: ("4", "n")}
# class -> (button text, short name for the agreement table, help line); nothing here may hint at the map
CLASS_TEXT = {
    UV_CLASS: ("Urban village", "UV", "dense, informal village housing inside the city."),
    BUILT_UP: ("Other built-up", "built-up", "estates, commerce, industry, institutions."),
    OTHER_CLASS: ("Not built-up", "not built", "roads, green, water, farmland, vacant land."),
}
CHANGE_TEXT = {
    CHANGE_OTHER: ("Other", "other", "no village at either date (whatever else is there, built or not)."),
    PERSISTENT_UV: ("Persistent UV", "persistent", "a village at both dates."),
    DEMOLISHED_UV: ("Demolished UV", "demolished", "a village at the first date, gone at the second."),
    NEW_UV: ("New UV", "new", "no village at the first date, a village at the second."),
}
MAP_KIND, CHANGE_KIND = "map", "change"
AUTO_SOURCES = ("catalog", "reference")  # references no person gave: catalog polygons (map), both dates' polygons (change)
MAX_BODY_BYTES = 16 * 1024
MAX_COMMENT_CHARS = 1000
CHIP_PX = 96  # chip side in imagery pixels (the labelling sheet's default)
CONTEXT_ZOOM = 4  # the context view spans this many chips across
CONTEXT_PX = 256  # the context view's side in output pixels (downsampled from CHIP_PX * CONTEXT_ZOOM)
CHIP_CACHE = 512  # rendered PNGs kept in memory (~20-60 KB each)
# Cohen's kappa's interval: a Dirichlet prior of total mass 1 spread evenly over the K x K agreement table (Perks'
# prior, 1/9 per cell for three classes), like one Jeffreys Beta(1/2, 1/2). Why not Jeffreys' 1/2 per cell: with
# 4.5 pseudo-counts, 3 of them off the diagonal, the posterior drags kappa down, and where people agree well the
# interval misses the truth. Measured (2,000 simulated pairs of labellers per case, nine 3 x 3 tables, kappa 0.10 to
# 0.98): Jeffreys' covers 44% at kappa 0.98 and 88% at 0.78 with n = 60; this prior 93-97% at n = 60 and 94-96% at
# n = 200 in every case, 91-97% at n = 30. tests/test_label.py keeps three of the cases. With a change run's four
# classes (1/16 per cell; 1,000 pairs per case, four 4 x 4 tables, kappa 0.51 to 0.95): 92-96% at n = 30, 60 and
# 200; tests/test_label_change.py keeps one case.
KAPPA_PRIOR_MASS = 1.0


class LabelInputError(ValueError):
    """A request the labelling server refuses (HTTP 400): unknown id or class, bad labeller name, too long a comment."""


class LabelFileError(ValueError):
    """A labels file that does not belong to this run's sample (HTTP 409): the message names the file and line."""


@dataclass(frozen=True)
class Answer:
    """One labeller's answer for one point."""

    id: str
    label: str
    unsure: bool = False
    comment: str = ""
    labelled_at: str = ""

    def to_json(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------------
# the sample


def labels_folder(products_dir: str | os.PathLike[str]) -> Path:
    """``products/<run>/accuracy/labels/``: the one folder ``label`` writes into."""
    return Path(products_dir) / ACCURACY_DIR / LABELS_DIR


def load_sample(products_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """The run's sample points (``samples.gpkg``) without geometry, in id order.

    Raises:
        FileNotFoundError: the run has no sample yet (says to run ``assess``).
        ValueError: the file lacks a column the app needs.
    """
    products_dir = Path(products_dir)
    path = products_dir / ACCURACY_DIR / SAMPLES_GPKG
    run = products_dir.name
    if not path.is_file():
        raise FileNotFoundError(f"run {run}: no accuracy sample at {path}; run `geolink-engine assess --run {run}` first")
    try:
        df = pyogrio.read_dataframe(path, layer=SAMPLES_LAYER, read_geometry=False)
    except Exception as exc:  # noqa: BLE001 (any reader failure is one line naming the file)
        raise ValueError(f"run {run}: {path} cannot be read ({exc}); run `geolink-engine assess --run {run}` again") from None
    missing = [c for c in ("id", "city", "lon", "lat", "x", "y", "crs") if c not in df.columns]
    if missing:
        raise ValueError(f"run {run}: {path} has no column(s) {missing}; run `geolink-engine assess --run {run}` again")
    df["id"] = df["id"].astype(str)
    return df.sort_values("id", kind="stable").reset_index(drop=True)


def points_to_label(sample: pd.DataFrame) -> pd.DataFrame:
    """The points people label: those no reference polygons label (``ref_source`` neither ``catalog`` of a map run
    nor ``reference`` of a change run: the points awaiting a label, and those labelled by people before, so a rerun
    of the assessment with an export keeps the same points and labels files); where polygons label every point, all
    of them (a check of that reference by people). Without ``ref_source``, the points whose ``ref_class`` is empty."""
    if "ref_source" in sample.columns:
        need = ~sample["ref_source"].astype(object).isin(AUTO_SOURCES).to_numpy()
    elif "ref_class" in sample.columns:
        need = sample["ref_class"].isna().to_numpy()
    else:
        return sample
    return (sample[need] if need.any() else sample).reset_index(drop=True)


@dataclass(frozen=True)
class RunKind:
    """What ``label`` needs to know of a run: ``map`` or ``change``, its classes and keys, and a change run's two
    vintages (the captions of its before and after views)."""

    kind: str
    classes: tuple[str, ...]
    keys: dict[str, tuple[str, ...]]
    text: dict[str, tuple[str, str, str]]
    vintages: tuple[str, str] | None = None

    @property
    def is_change(self) -> bool:
        return self.kind == CHANGE_KIND

    def buttons(self) -> list[dict]:
        """The class buttons in key order: ``class, name, short, keys, help``."""
        order = sorted(self.classes, key=lambda c: self.keys[c][0])
        return [{"class": c, "name": self.text[c][0], "short": self.text[c][1], "keys": list(self.keys[c]),
                 "help": self.text[c][2]} for c in order]


MAP_RUN = RunKind(MAP_KIND, LAND_CLASSES, CLASS_KEYS, CLASS_TEXT)


def run_vintages(products_dir: str | os.PathLike[str]) -> tuple[str, str] | None:
    """A change run's ``(before, after)`` vintages from its ``run.json`` (``"kind": "change"``); None for a map run
    (or a run without a readable ``run.json``). Falls back to the runs' names, then to ``before``/``after``.

    The CLI picks each date's catalog rows with them (:func:`engine.catalog.select_vintage`).
    """
    try:
        doc = json.loads((Path(products_dir) / RUN_JSON).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("kind") != CHANGE_KIND:
        return None
    vintages = doc.get("vintages")
    if isinstance(vintages, list | tuple) and len(vintages) == 2 and all(isinstance(v, str) and v for v in vintages):
        return str(vintages[0]), str(vintages[1])
    return str(doc.get("before") or "before"), str(doc.get("after") or "after")


def run_kind(products_dir: str | os.PathLike[str], sample: pd.DataFrame | None = None) -> RunKind:
    """The run's :class:`RunKind`: a change run by its ``run.json``, or (without one) by a sample with
    ``ref_before``/``ref_after`` (the change assessment's columns).

    Raises:
        ValueError: a change run whose sample holds map classes (an old map assessment: run the change one again).
    """
    products_dir = Path(products_dir)
    vintages = run_vintages(products_dir)
    if vintages is None and sample is not None and not (products_dir / RUN_JSON).is_file() \
            and {"ref_before", "ref_after"} <= set(sample.columns):
        vintages = ("before", "after")
    if vintages is None:
        return MAP_RUN
    if sample is not None and "map_class" in sample.columns:
        stray = sorted(set(sample["map_class"].dropna().astype(str)) - set(CHANGE_CLASSES))
        if stray:
            raise ValueError(f"run {products_dir.name} is a change run, but its accuracy sample has map classes "
                             f"{stray}; run its change assessment again")
    return RunKind(CHANGE_KIND, tuple(CHANGE_CLASSES), CHANGE_KEYS, CHANGE_TEXT, vintages)


def sample_version(points: pd.DataFrame) -> str:
    """A short fingerprint of the points (ids and places): the page's images are cached under it, and a save from a
    page of an older sample is refused."""
    text = "\n".join(f"{i},{lon:.8f},{lat:.8f}" for i, lon, lat in zip(points["id"], points["lon"], points["lat"]))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------------------------
# the store


class LabelStore:
    """Every labeller's answers for one run's sample, one CSV per labeller under ``accuracy/labels/``.

    Each :meth:`save` reads the labeller's file, changes one row and writes the whole file again through a
    temporary file renamed over it, under a lock: a reader sees the old file or the new one, never half of one.

    Example:
        >>> store = LabelStore("geolink-data/products/default")          # doctest: +SKIP
        >>> store.save("alice", "p00001", "urban_village").label          # doctest: +SKIP
        'urban_village'
    """

    def __init__(self, products_dir: str | os.PathLike[str]) -> None:
        self.products_dir = Path(products_dir)
        self.run = self.products_dir.name
        self.sample = load_sample(self.products_dir)
        self.kind = run_kind(self.products_dir, self.sample)
        self.classes: tuple[str, ...] = self.kind.classes
        self.points = points_to_label(self.sample)
        self.ids: list[str] = self.points["id"].tolist()
        self._rows = {r["id"]: r for r in self.points[list(POINT_COLUMNS)].to_dict("records")}
        self.version = sample_version(self.points)
        self.folder = labels_folder(self.products_dir)
        self._lock = threading.Lock()

    # -- names and paths -------------------------------------------------------------------------------------------
    def path(self, labeller: object) -> Path:
        """The labeller's CSV (the name checked first: it becomes a file name)."""
        try:
            name = check_name("labeller", labeller)
        except ValueError as exc:
            raise LabelInputError(str(exc)) from None
        return self.folder / f"{name}.csv"

    def labellers(self) -> list[str]:
        """Names with a labels file, sorted."""
        if not self.folder.is_dir():
            return []
        return sorted(p.stem for p in self.folder.glob("*.csv") if p.is_file() and _is_name(p.stem))

    def is_point(self, point_id: object) -> bool:
        """Whether ``point_id`` is a point to label."""
        return isinstance(point_id, str) and point_id in self._rows

    def public_points(self) -> list[dict]:
        """The points as the browser sees them: ``id, city, lon, lat`` only (blind to the map), in id order."""
        return [dict(self._rows[i]) for i in self.ids]

    # -- reading ---------------------------------------------------------------------------------------------------
    def answers(self, labeller: str) -> dict[str, Answer]:
        """The labeller's answers by id (empty when they have none yet).

        Raises:
            LabelInputError: a bad name.
            LabelFileError: the file names a point this sample lacks, or a point at another place (a file of an
                earlier draw), or holds an unknown class: the message names the file and line.
        """
        path = self.path(labeller)
        if not path.is_file():
            return {}
        out: dict[str, Answer] = {}
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in ("id", "label") if c not in (reader.fieldnames or [])]
            if missing:
                raise LabelFileError(f"{path}: line 1: no column(s) {missing}; move the file away to start afresh")
            for line, row in enumerate(reader, start=2):
                answer = self._answer_of_row(path, line, row)
                if answer is not None:
                    out[answer.id] = answer
        return out

    def _answer_of_row(self, path: Path, line: int, row: dict) -> Answer | None:
        """One row of a labels file checked against the sample (None for a row without a label)."""
        pid, label = (row.get("id") or "").strip(), (row.get("label") or "").strip()
        if not pid and not label:
            return None
        point = self._rows.get(pid)
        if point is None:
            raise LabelFileError(f"{path}: line {line}: id {pid!r} is not a point of run {self.run}'s sample; the file "
                                 f"belongs to another draw: move it away")
        for axis in ("lon", "lat"):
            value = _float(row.get(axis))
            if value is not None and not abs(value - point[axis]) <= LONLAT_TOLERANCE_DEG:
                raise LabelFileError(f"{path}: line {line}: point {pid} lies at {axis} {point[axis]:.8f}, the file says "
                                     f"{row.get(axis)}; the file belongs to another draw: move it away")
        if not label:
            return None
        if label not in self.classes:
            raise LabelFileError(f"{path}: line {line}: label {label!r} of {pid} is not one of {list(self.classes)}")
        return Answer(pid, label, (row.get("unsure") or "").strip().lower() in ("yes", "true", "1"),
                      (row.get("comment") or "").strip(), (row.get("labelled_at") or "").strip())

    def progress(self, labeller: str) -> dict:
        """``labelled``, ``total`` and ``first_unlabelled`` (the id to resume at; None when all are done)."""
        answers = self.answers(labeller)
        first = next((i for i in self.ids if i not in answers), None)
        return {"labelled": sum(i in answers for i in self.ids), "total": len(self.ids), "first_unlabelled": first}

    # -- writing ---------------------------------------------------------------------------------------------------
    def check_answer(self, point_id: object, label: object, unsure: object = False, comment: object = "") -> Answer:
        """The answer if every field is valid, else :class:`LabelInputError` naming the first bad one."""
        if not self.is_point(point_id):
            raise LabelInputError(f"id {point_id!r} is not a point to label in run {self.run}'s sample")
        if not isinstance(label, str) or label not in self.classes:
            raise LabelInputError(f"label {label!r} is not one of {list(self.classes)}")
        if not isinstance(unsure, bool):
            raise LabelInputError(f"unsure {unsure!r} must be true or false")
        if not isinstance(comment, str):
            raise LabelInputError(f"comment must be text, not {type(comment).__name__}")
        if len(comment) > MAX_COMMENT_CHARS:
            raise LabelInputError(f"comment has {len(comment)} characters; at most {MAX_COMMENT_CHARS}")
        if any(ord(ch) < 32 and ch not in "\t\r\n" for ch in comment):
            raise LabelInputError("comment holds control characters; write plain text")
        comment = " ".join(comment.split())  # one line per CSV row, whatever was pasted
        return Answer(point_id, label, unsure, comment, datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))

    def save(self, labeller: str, point_id: object, label: object, unsure: object = False, comment: object = "") -> Answer:
        """Check one answer and write it into the labeller's file (replacing their earlier answer for the point).

        Raises:
            LabelInputError: a bad name, id, class, flag or comment.
            LabelFileError: the labeller's file belongs to another sample.
        """
        path = self.path(labeller)
        answer = self.check_answer(point_id, label, unsure, comment)
        with self._locked():
            answers = self.answers(labeller)
            answers[answer.id] = answer
            self._write(path, LABEL_COLUMNS, [self._row(answers[i]) for i in self.ids if i in answers])
        return answer

    def _row(self, answer: Answer) -> dict:
        point = self._rows[answer.id]
        return {"id": answer.id, "city": point["city"], "lon": f"{point['lon']:.8f}", "lat": f"{point['lat']:.8f}",
                "label": answer.label, "unsure": "yes" if answer.unsure else "no", "comment": answer.comment,
                "labelled_at": answer.labelled_at}

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """This process's lock, then the folder's advisory file lock (another server on the same run)."""
        with self._lock:
            self.folder.mkdir(parents=True, exist_ok=True)
            if fcntl is None:
                yield
                return
            with (self.folder / LOCK_NAME).open("a") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(fh, fcntl.LOCK_UN)

    @staticmethod
    def _write(path: Path, columns: tuple[str, ...], rows: list[dict], check=None) -> None:
        """Write a CSV atomically, synced to disk before the rename; ``check(tmp)`` may refuse it first."""
        with atomic_path(path) as tmp:
            with tmp.open("w", newline="", encoding="utf-8") as fh:
                writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)
                fh.flush()
                os.fsync(fh.fileno())
            if check is not None:
                check(tmp)

    # -- export and agreement --------------------------------------------------------------------------------------
    def export(self, labeller: str, partial: bool = False) -> Path:
        """Write ``labels/<labeller>.reference.csv``, the file ``assess --reference`` reads (see
        :func:`export_reference`)."""
        path = self.path(labeller)
        out = path.with_name(path.stem + REFERENCE_SUFFIX)
        answers = self.answers(labeller)
        todo = [i for i in self.ids if i not in answers]
        if len(todo) == len(self.ids):
            raise LabelInputError(f"labeller {labeller} has labelled no point of run {self.run} yet")
        if todo and not partial:
            raise LabelInputError(f"labeller {labeller}: {len(todo)} of {len(self.ids)} points of run {self.run} have no "
                                  f"label yet (first {todo[0]}); label them all before exporting")
        required = set() if partial else set(self.ids)

        def check(tmp: Path) -> None:  # exactly what `assess --reference` will do with it
            read_labels(tmp, self.sample, required=required, classes=self.classes)

        rows = [self._row(answers[i]) for i in self.ids if i in answers]
        with self._locked():
            self._write(out, REFERENCE_COLUMNS, rows, check)
        return out

    def agreement(self, a: str, b: str) -> dict:
        """Agreement of labellers ``a`` and ``b`` on the points both labelled.

        Returns:
            ``a``, ``b``, ``n`` (points both labelled), ``n_a``, ``n_b``, ``classes``, ``table`` (``a``'s class by
            row, ``b``'s by column), ``observed_agreement``, ``kappa`` (Cohen's; None where undefined: no point, or
            both gave every point one class), ``kappa_lo``/``kappa_hi`` (95% interval, :func:`kappa_interval`;
            None without points), ``unsure`` (shared points either marked unsure) and ``disagreements`` (their ids).
        """
        if self.path(a) == self.path(b):
            raise LabelInputError(f"agreement needs two different labellers, got {a!r} twice")
        ans_a, ans_b = self.answers(a), self.answers(b)
        shared = [i for i in self.ids if i in ans_a and i in ans_b]
        table = agreement_table([ans_a[i].label for i in shared], [ans_b[i].label for i in shared], self.classes)
        n = len(shared)
        lo, hi = kappa_interval(table) if n else (None, None)
        return {"a": a, "b": b, "n": n, "n_a": len(ans_a), "n_b": len(ans_b), "classes": list(self.classes),
                "table": table.astype(int).tolist(), "observed_agreement": float(np.trace(table) / n) if n else None,
                "kappa": cohen_kappa(table), "kappa_lo": lo, "kappa_hi": hi, "interval": "95% posterior, Dirichlet "
                "prior of total mass 1 on the agreement table, widened to hold the estimate",
                "unsure": sum(ans_a[i].unsure or ans_b[i].unsure for i in shared),
                "disagreements": [i for i in shared if ans_a[i].label != ans_b[i].label]}


def _is_name(text: str) -> bool:
    try:
        check_name("labeller", text)
    except ValueError:
        return False
    return True


def _float(text: object) -> float | None:
    try:
        return float(str(text).strip()) if text not in (None, "") else None
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------------------------
# agreement statistics


def agreement_table(labels_a: list[str], labels_b: list[str], classes: tuple[str, ...] = LAND_CLASSES) -> np.ndarray:
    """K x K counts of the points' classes by labeller a (rows) and b (columns).

    >>> agreement_table(["other", "other", "built_up"], ["other", "built_up", "built_up"]).tolist()
    [[1, 0, 1], [0, 0, 0], [0, 0, 1]]
    """
    index = {c: k for k, c in enumerate(classes)}
    table = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for x, y in zip(labels_a, labels_b):
        table[index[x], index[y]] += 1
    return table


def _kappa_of(p: np.ndarray) -> np.ndarray:
    """Cohen's kappa of cell proportions ``(..., K, K)``; NaN where chance agreement is 1."""
    po = np.trace(p, axis1=-2, axis2=-1)
    pe = (p.sum(axis=-1) * p.sum(axis=-2)).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pe < 1, (po - pe) / np.where(pe < 1, 1 - pe, 1), np.nan)


def cohen_kappa(table: np.ndarray) -> float | None:
    """Cohen's kappa ``(p_o - p_e) / (1 - p_e)`` of a K x K agreement table; None when undefined (no points, or
    both labellers put every point in one class, so chance agreement is 1).

    >>> cohen_kappa(np.array([[20, 5], [10, 15]]))
    0.4
    """
    table = np.asarray(table, dtype=float)
    n = table.sum()
    if n <= 0:
        return None
    value = float(_kappa_of(table / n))
    return None if np.isnan(value) else round(value, 12)


def kappa_interval(table: np.ndarray, draws: int = POSTERIOR_DRAWS, seed: int = POSTERIOR_SEED,
                   prior_mass: float = KAPPA_PRIOR_MASS, level: float = 0.95) -> tuple[float, float]:
    """Equal-tailed posterior interval of Cohen's kappa, never of zero width.

    The cell proportions of the agreement table get a Dirichlet(``n_ij + prior_mass / K^2``) posterior (the
    points are a random sample; multinomial likelihood); kappa is computed for each of ``draws`` draws (fixed
    ``seed``: the same table gives the same interval) and the interval is their ``(t, 1 - t)`` quantiles,
    widened to hold the point estimate (so perfect agreement gives an upper bound of exactly 1, while the lower
    bound stays below it: agreement on 20 points does not prove agreement everywhere). Why this prior: see
    :data:`KAPPA_PRIOR_MASS`; its coverage is measured in tests/test_label.py.

    Example:
        >>> lo, hi = kappa_interval(np.diag([20, 10, 5]))
        >>> hi == 1.0 and 0.7 < lo < 1.0
        True
    """
    table = np.asarray(table, dtype=float)
    k = table.shape[-1]
    rng = np.random.default_rng(seed)
    shape = (table + prior_mass / (k * k)).reshape(-1)
    gamma = rng.standard_gamma(shape, size=(draws, shape.size))
    p = (gamma / gamma.sum(axis=1, keepdims=True)).reshape(draws, k, k)
    kappa = _kappa_of(p)
    kappa = kappa[~np.isnan(kappa)]
    tail = (1.0 - level) / 2
    lo, hi = (float(q) for q in np.quantile(kappa, [tail, 1.0 - tail]))
    point = cohen_kappa(table)
    if point is not None:
        lo, hi = min(lo, point), max(hi, point)
    return lo, hi


# ---------------------------------------------------------------------------------------------------------------
# image chips


class ChipRenderer:
    """PNG views of the imagery around each point, rendered on first request by a window read and kept in a small
    LRU cache (the page asks for the next points ahead of time).

    A point whose city has no readable imagery gets a grey placeholder saying so, never an error: the person can
    still label it from the context of other sources, or mark it unsure.
    """

    def __init__(self, points: pd.DataFrame, imagery: Mapping[str, str | None], chip_px: int = CHIP_PX,
                 context_zoom: int = CONTEXT_ZOOM, context_px: int = CONTEXT_PX, cache_size: int = CHIP_CACHE) -> None:
        self._points = {r["id"]: r for r in points[["id", "city", "x", "y", "crs"]].to_dict("records")}
        self.imagery = dict(imagery)
        self.chip_px, self.context_zoom, self.context_px = chip_px, context_zoom, context_px
        self._cache: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.notes = {city: note for city in sorted({r["city"] for r in self._points.values()})
                      if (note := self._imagery_note(city))}

    def _imagery_note(self, city: str) -> str:
        """Why the city's imagery cannot be shown ('' when it can): read once, the header only."""
        path = self.imagery.get(city)
        if not path:
            return f"no imagery: city {city} has no imagery in the catalog"
        try:
            with rasterio.open(path):
                return ""
        except Exception as exc:  # noqa: BLE001 (one line for the page)
            return f"no imagery: {Path(str(path)).name} of city {city} cannot be read ({_first_line(exc)})"

    def png(self, kind: str, point_id: str) -> bytes:
        """The ``chip`` or ``context`` PNG of a point (KeyError: not a point of the sample)."""
        point = self._points[point_id]
        key = (kind, point_id)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        data = _encode_png(self._render(kind, point))
        with self._lock:
            self._cache[key] = data
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return data

    def _render(self, kind: str, point: dict) -> np.ndarray:
        side = self.chip_px * 4 if kind == "chip" else self.context_px
        note = self.notes.get(point["city"])
        if note:
            return placeholder(side, note)
        try:
            with rasterio.open(self.imagery[point["city"]]) as src:
                x, y = point["x"], point["y"]
                if src.crs is not None and not CRS.from_user_input(src.crs).equals(CRS.from_user_input(point["crs"])):
                    x, y = Transformer.from_crs(point["crs"], src.crs, always_xy=True).transform(x, y)
                if kind == "chip":
                    return render_chip(src, float(x), float(y), self.chip_px)
                return render_chip(src, float(x), float(y), self.chip_px, self.context_zoom, self.context_px)
        except Exception as exc:  # noqa: BLE001 (a placeholder, never a crash)
            log.warning("label: %s view of %s: %s", kind, point["id"], _first_line(exc))
            return placeholder(side, f"imagery cannot be read here ({_first_line(exc)})")


def placeholder(side_px: int, text: str) -> np.ndarray:
    """A grey square with ``text`` on it (Pillow's built-in font: nothing to fetch)."""
    img = Image.new("RGB", (side_px, side_px), (64, 64, 64))
    draw = ImageDraw.Draw(img)
    width = max(8, side_px // 7)
    draw.multiline_text((6, 6), "\n".join(textwrap.wrap(text, width)[:12]), fill=(240, 240, 240))
    return np.asarray(img)


def _encode_png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------------------------
# the server


@dataclass
class LabelApp:
    """What every request of one labelling server shares."""

    store: LabelStore
    chips: ChipRenderer  # a map run's imagery, or a change run's before date
    default_labeller: str | None = None
    local_only: bool = True  # refuse requests whose Host is not this machine (DNS rebinding)
    chips_after: ChipRenderer | None = None  # a change run's after date

    def renderer(self, view: str) -> tuple[ChipRenderer, str] | None:
        """The renderer and its kind (``chip``/``context``) of a URL's view (``chip``, ``context``, and for a change
        run ``chip-after``, ``context-after``); None for any other."""
        kind, _, date = view.partition("-")
        if kind not in ("chip", "context"):
            return None
        if not date:
            return self.chips, kind
        if date == "after" and self.chips_after is not None:
            return self.chips_after, kind
        return None

    def note(self, city: str) -> str:
        """Why a city's imagery cannot be shown ('' when it can); a change run's says which date."""
        vintages = self.store.kind.vintages
        if self.chips_after is None or vintages is None:
            return self.chips.notes.get(city, "")
        parts = [f"{when} ({vintage}): {note}" for when, vintage, chips in
                 (("before", vintages[0], self.chips), ("after", vintages[1], self.chips_after))
                 if (note := chips.notes.get(city))]
        return "; ".join(parts)


class LabelHandler(StaticHandler):
    """The page's static files, its JSON API and the image views (see the module docstring)."""

    def __init__(self, *args, app: LabelApp, **kwargs) -> None:
        self.app = app
        super().__init__(*args, **kwargs)

    # -- routing ---------------------------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        parts = urllib.parse.urlsplit(self.path)
        route, query = parts.path, urllib.parse.parse_qs(parts.query)
        if route.startswith(("/api/", "/chip/", "/context/", "/chip-", "/context-")):
            self.guarded(lambda: self.api_get(route, query))
            return
        if route in ("", "/"):
            self.path = "/" + PAGE
        self.send_file(head=False)

    def do_POST(self) -> None:  # noqa: N802
        route = urllib.parse.urlsplit(self.path).path
        self.guarded(lambda: self.api_post(route))

    def guarded(self, handle) -> None:
        """Run one API request: bad input -> 400, a stray labels file -> 409, anything else -> 500, one line each."""
        try:
            if not self.host_allowed():
                raise _HttpError(HTTPStatus.FORBIDDEN, "requests must come from this machine's own address")
            handle()
        except _HttpError as exc:
            self.send_json(exc.status, {"error": exc.message})
        except LabelInputError as exc:
            self.send_json(HTTPStatus.BAD_REQUEST, {"error": _first_line(exc)})
        except LabelFileError as exc:
            self.send_json(HTTPStatus.CONFLICT, {"error": _first_line(exc)})
        except ValueError as exc:  # e.g. read_labels refusing an export
            self.send_json(HTTPStatus.BAD_REQUEST, {"error": _first_line(exc)})
        except Exception as exc:  # noqa: BLE001 (the server keeps serving)
            log.exception("label: %s %s", self.command, self.path)
            self.send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(exc).__name__}: {_first_line(exc)}"})

    def host_allowed(self) -> bool:
        """A loopback server answers only requests addressed to the loopback (a page of another site that points
        its own host name at 127.0.0.1 is refused)."""
        if not self.app.local_only:
            return True
        host = urllib.parse.urlsplit("//" + (self.headers.get("Host") or "")).hostname or ""
        return host in LOCAL_HOSTS

    def api_get(self, route: str, query: dict[str, list[str]]) -> None:
        store = self.app.store
        if not route.startswith("/api/"):
            view, _, name = route.strip("/").partition("/")
            found = self.app.renderer(view)
            if found is None:
                raise _HttpError(HTTPStatus.NOT_FOUND, f"no view {view!r} of this run")
            point_id = name[:-4] if name.endswith(".png") else None
            if not store.is_point(point_id):
                raise _HttpError(HTTPStatus.NOT_FOUND, f"no point {name!r} in this sample")
            renderer, kind = found
            self.send_bytes(renderer.png(kind, point_id), "image/png", "private, max-age=86400")
        elif route == "/api/samples":
            points = [{**p, "note": self.app.note(p["city"])} for p in store.public_points()]
            kind = store.kind
            self.send_json(HTTPStatus.OK, {"run": store.run, "kind": kind.kind,
                                           "vintages": list(kind.vintages) if kind.vintages else None,
                                           "version": store.version, "classes": list(kind.classes),
                                           "keys": {c: list(k) for c, k in kind.keys.items()},
                                           "buttons": kind.buttons(),
                                           "default_labeller": self.app.default_labeller, "points": points})
        elif route == "/api/labellers":
            self.send_json(HTTPStatus.OK, {"labellers": [{"name": n, "labelled": store.progress(n)["labelled"]}
                                                         for n in store.labellers()]})
        elif route == "/api/labels":
            labeller = _one(query, "labeller")
            answers = store.answers(labeller)
            self.send_json(HTTPStatus.OK, {"labeller": labeller, "answers": {i: a.to_json() for i, a in answers.items()},
                                           **store.progress(labeller)})
        elif route == "/api/agreement":
            self.send_json(HTTPStatus.OK, store.agreement(_one(query, "a"), _one(query, "b")))
        else:
            raise _HttpError(HTTPStatus.NOT_FOUND, f"no API {route}")

    def api_post(self, route: str) -> None:
        if route not in ("/api/labels", "/api/export"):
            raise _HttpError(HTTPStatus.NOT_FOUND, f"no API {route} (POST)")
        body = self.read_json()
        store = self.app.store
        labeller = body.get("labeller")
        if route == "/api/export":
            path = store.export(labeller)
            self.send_json(HTTPStatus.OK, {"path": str(path), "rows": len(store.answers(labeller))})
            return
        if "version" in body and body["version"] != store.version:
            raise _HttpError(HTTPStatus.CONFLICT, "the sample changed since this page was loaded; reload the page")
        unknown = sorted(set(body) - {"labeller", "id", "label", "unsure", "comment", "version"})
        if unknown:
            raise LabelInputError(f"unknown field(s) {unknown}; send labeller, id, label, unsure, comment")
        answer = store.save(labeller, body.get("id"), body.get("label"), body.get("unsure", False), body.get("comment", ""))
        progress = store.progress(labeller)
        self.send_json(HTTPStatus.OK, {"answer": answer.to_json(), "labelled": progress["labelled"],
                                       "total": progress["total"]})

    # -- bodies ----------------------------------------------------------------------------------------------------
    def read_json(self) -> dict:
        """The request's JSON object: at most :data:`MAX_BODY_BYTES`, ``application/json``, from this origin."""
        origin = self.headers.get("Origin")
        if origin and urllib.parse.urlsplit(origin).netloc != (self.headers.get("Host") or ""):
            raise _HttpError(HTTPStatus.FORBIDDEN, f"a write from another origin ({origin}) is refused")
        if (self.headers.get("Content-Type") or "").split(";")[0].strip().lower() != "application/json":
            raise _HttpError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send the body as application/json")
        try:
            length = int(self.headers.get("Content-Length") or "")
        except ValueError:
            raise _HttpError(HTTPStatus.LENGTH_REQUIRED, "a Content-Length header is required") from None
        if length < 0 or length > MAX_BODY_BYTES:
            self.close_connection = True  # the unread body must not be taken for the next request
            raise _HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the body has {length} bytes; at most {MAX_BODY_BYTES}")
        try:
            body = json.loads(self.rfile.read(length).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise LabelInputError(f"the body is not JSON ({exc})") from None
        if not isinstance(body, dict):
            raise LabelInputError("the body must be a JSON object")
        return body

    def send_json(self, status: HTTPStatus, doc: dict) -> None:
        self.send_bytes(json.dumps(doc, allow_nan=False).encode(), "application/json", "no-store", status)

    def send_bytes(self, data: bytes, content_type: str, cache: str, status: HTTPStatus = HTTPStatus.OK) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", cache)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", CSP)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


class _HttpError(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _one(query: dict[str, list[str]], name: str) -> str:
    values = query.get(name) or []
    if len(values) != 1 or not values[0]:
        raise LabelInputError(f"give one ?{name}=NAME")
    return values[0]


def make_label_server(products_dir: str | os.PathLike[str], catalog_rows: list[dict], host: str = "127.0.0.1",
                      port: int = 0, labeller: str | None = None,
                      after_rows: list[dict] | None = None) -> ThreadingHTTPServer:
    """The labelling server of one run (not yet serving: call ``serve_forever``).

    Args:
        products_dir: ``products/<run>/`` with ``accuracy/samples.gpkg`` (from ``geolink-engine assess``, or a change
            run's from :func:`engine.accuracy.change.run_change_assess`).
        catalog_rows: catalog rows (``city``, ``imagery``): where each city's chips are read from; for a change run,
            the before date's rows (:func:`run_vintages` names the dates).
        host: the address to bind (the loopback by default: see :func:`engine.web.server.make_server`).
        port: 0 for a free port (read ``server.server_address``).
        labeller: the name the page starts with (otherwise ``?labeller=`` or the page asks).
        after_rows: a change run's after-date catalog rows (``city``, ``imagery``); required for a change run, refused
            for a map run.

    Returns:
        The server; ``server.label_app`` holds its :class:`LabelApp` (the store and the chips).

    Raises:
        FileNotFoundError: the run has no sample (says to run ``assess`` first).
        ValueError: a bad ``labeller`` name, an unreadable sample, a change run without ``after_rows`` or a map run
            with them.

    Example::

        server = make_label_server(ws.products("default"), catalog.to_pylist(), labeller="alice")
        print(server_url(server)); server.serve_forever()
        # a change run: each date's rows
        before, after = run_vintages(ws.products("2018-to-2024"))
        server = make_label_server(ws.products("2018-to-2024"), select_vintage(catalog, before).to_pylist(),
                                   after_rows=select_vintage(catalog, after).to_pylist())
    """
    store = LabelStore(products_dir)
    vintages = store.kind.vintages
    if store.kind.is_change and after_rows is None:
        raise ValueError(f"run {store.run} is a change run ({vintages[0]} -> {vintages[1]}): give the after date's "
                         f"catalog rows (after_rows) as well as the before date's, so both dates can be shown")
    if not store.kind.is_change and after_rows is not None:
        raise ValueError(f"run {store.run} is a map run (one date): after_rows are for a change run only")
    if labeller is not None:
        store.path(labeller)  # the name is checked before anything is served
    points = store.sample[store.sample["id"].isin(store.ids)]
    chips = ChipRenderer(points, _imagery_of(catalog_rows))
    chips_after = ChipRenderer(points, _imagery_of(after_rows)) if after_rows is not None else None
    app = LabelApp(store, chips, labeller, local_only=is_local_host(host), chips_after=chips_after)
    server = make_server(STATIC_DIR, host, port, handler=LabelHandler, app=app)
    server.label_app = app
    return server


def _imagery_of(rows: list[dict]) -> dict[str, str | None]:
    return {r["city"]: r.get("imagery") for r in rows if r.get("city")}


def export_reference(products_dir: str | os.PathLike[str], labeller: str, partial: bool = False) -> Path:
    """Write ``accuracy/labels/<labeller>.reference.csv`` for ``geolink-engine assess --reference`` (a change run:
    for :func:`engine.accuracy.change.run_change_assess`'s ``reference_labels``).

    Columns ``id, city, lon, lat, label, unsure, comment``, one row per labelled point in id order; the file is
    read back with :func:`engine.accuracy.reference.read_labels` (with the run's classes) against the run's sample
    before it replaces an earlier export, so the assessment accepts it.

    Args:
        products_dir: ``products/<run>/``.
        labeller: whose answers.
        partial: allow points without a label (``assess`` then needs them from elsewhere); default: refuse.

    Raises:
        LabelInputError (a ValueError): a bad name, no labels, or unlabelled points (without ``partial``).
        FileNotFoundError: the run has no sample.
    """
    return LabelStore(products_dir).export(labeller, partial)


def agreement(products_dir: str | os.PathLike[str], a: str, b: str) -> dict:
    """Cohen's kappa of labellers ``a`` and ``b`` on run ``products_dir``'s sample, with its 95% interval (see
    :meth:`LabelStore.agreement`)."""
    return LabelStore(products_dir).agreement(a, b)


def format_agreement(doc: dict) -> str:
    """One line for the console of an :func:`agreement` document.

    >>> format_agreement({"a": "ann", "b": "bo", "n": 40, "kappa": 0.71, "kappa_lo": 0.52, "kappa_hi": 0.86,
    ...                   "observed_agreement": 0.85, "unsure": 3, "disagreements": ["p00002"] * 6})
    'ann vs bo: kappa 0.71 [0.52, 0.86] (95%) on 40 points both labelled; they agree on 85% (6 differ, 3 marked unsure)'
    """
    if not doc["n"]:
        return f"{doc['a']} vs {doc['b']}: no point labelled by both yet"
    kappa = "undefined (both gave every point one class)" if doc["kappa"] is None else f"{doc['kappa']:.2f}"
    return (f"{doc['a']} vs {doc['b']}: kappa {kappa} [{doc['kappa_lo']:.2f}, {doc['kappa_hi']:.2f}] (95%) on {doc['n']} "
            f"points both labelled; they agree on {doc['observed_agreement']:.0%} ({len(doc['disagreements'])} differ, "
            f"{doc['unsure']} marked unsure)")
