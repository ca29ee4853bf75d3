"""Where every stage reads and writes: one root, every location derived from it, every name checked once.

Why one owner: the layout used to be spelled out in each stage (``"products"/run`` in five modules,
``tiles/city=<c>/index`` in four), city and run names were checked in fifteen places with five messages, and
remote sync calls were scattered. As in raster-vision (``root_uri`` plus ``update()``), a :class:`Workspace` is
built once at each entry point (the CLI callback, each ``jobs/*.py``) and passed down; library code asks it for
paths and never joins layout strings itself.

Layout (unchanged by this module; ``docs/ARCHITECTURE.md`` "Workspace layout")::

    catalog.yaml                               demo catalog (paths relative to it)
    cities/<city>/                             demo inputs: imagery.tif, truth.tif, osm.parquet, reference.parquet
    preview/<city>.png
    tiles/city=<city>/index/part-*.parquet     tile index, Hive-partitioned by city
    tiles/vintage=<v>/city=<city>/...          the same per vintage of a multi-date catalog (imagery/ too)
    tiles/city=<city>/graphs/part-*.parquet    one OSM graph per tile
    tiles/_state/<city>.json                   completion marker (written last)
    tiles/_staging/<city>/                     a city being prepared
    models/<name>/                             model bundles (``engine.model_bundle``)
    runs/<run>/                                run.json, ledger.duckdb, status.json, predictions/city=<city>/, _done/
    runs/<run>/embeddings/<mode>_<level>/      an embedding pass: the same files (its parts hold vectors)
    runs/train/                                Ray Train's storage (checkpoints of training runs)
    products/<run>/                            products (files inside: ``engine.product_layout``)
    logs/<command>.log                         what prepare, pretrain and finetune wrote besides their display

A remote workspace (``s3://``, ``gs://``) is worked on through its node-local mirror (:mod:`engine.storage`);
:meth:`Workspace.fetch` and :meth:`Workspace.publish` are its sync points (no-ops for a local folder).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from engine import storage
from engine.schema import CITY_SLUG_RE

CATALOG_NAMES = ("catalog.yaml", "catalog.yml", "catalog.csv", "catalog.parquet")
DEMO_CATALOG = "catalog.yaml"
TRAIN_RUNS = "train"  # runs/train: Ray Train's storage; not a map run name a user can take
TILE_PARTS = ("index", "graphs")  # tiles/city=<c>/<kind>/part-*.parquet: same tiles, same order


class BadName(ValueError):
    """A city, run or model name that cannot become a folder name."""


def check_name(kind: str, name: object) -> str:
    """``name`` when it is a valid slug (it becomes a folder: no ``/``, ``..``, spaces or capitals); else one line.

    >>> check_name("city", "xian")
    'xian'
    >>> check_name("run", "../etc")
    Traceback (most recent call last):
    ...
    engine.workspace.BadName: run name '../etc' is not a valid slug (lowercase letters, digits, '-' and '_', at most 63, matching ^[a-z0-9][a-z0-9_-]{0,62}$)
    """
    if not isinstance(name, str) or not CITY_SLUG_RE.match(name):
        raise BadName(f"{kind} name {name!r} is not a valid slug (lowercase letters, digits, '-' and '_', at most 63, "
                      f"matching {CITY_SLUG_RE.pattern})")
    return name


def is_valid_name(name: object) -> bool:
    """Whether ``name`` passes :func:`check_name` (for cleanup paths that must not raise)."""
    return isinstance(name, str) and bool(CITY_SLUG_RE.match(name))


@dataclass(frozen=True)
class RunFolder:
    """The files of one map run, ``runs/<run>/`` (picklable: prediction actors get one to write their parts).

    >>> RunFolder(Path("ws/runs/a")).predictions_city("xian").as_posix()
    'ws/runs/a/predictions/city=xian'
    """

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def manifest(self) -> Path:
        return self.root / "run.json"

    @property
    def ledger(self) -> Path:
        return self.root / "ledger.duckdb"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions"

    def predictions_city(self, city: str) -> Path:
        return self.predictions / f"city={check_name('city', city)}"

    @property
    def status(self) -> Path:
        """The driver's progress report (``engine.mapping.status``): read by `geolink-engine status` while the ledger
        is held by the running map."""
        return self.root / "status.json"

    @property
    def done(self) -> Path:
        """Per city, the tiles already done (small Parquet files the read tasks filter on)."""
        return self.root / "_done"


@dataclass(frozen=True)
class Workspace:
    """A workspace: ``location`` as given (a folder or an object-store URI) and ``root``, the local folder worked in.

    >>> ws = Workspace.at("geolink-data")
    >>> ws.tile_index("xian").as_posix(), ws.products("default").as_posix()
    ('geolink-data/tiles/city=xian/index', 'geolink-data/products/default')
    >>> Workspace.at(ws) is ws
    True
    """

    location: str
    root: Path
    vintage: str | None = None  # the imagery date worked on: its prepared tiles and imagery VRTs live apart (issue 22)

    @classmethod
    def at(cls, location: Workspace | str | os.PathLike[str]) -> Workspace:
        """The workspace at ``location``; a :class:`Workspace` is returned as is (library functions accept either)."""
        if isinstance(location, Workspace):
            return location
        text = str(location)
        return cls(location=text, root=storage.workspace_root(text))

    def with_vintage(self, vintage: str | None) -> Workspace:
        """This workspace for one vintage of the catalog (``None``: as it is). What depends on the imagery of a date,
        the prepared tiles and the imagery VRTs, moves under ``vintage=<v>/``, so two dates of a city never overwrite
        each other's; models, runs and products stay shared (a run is named per date).

        >>> Workspace.at("ws").with_vintage("2024").tile_index("xian").as_posix()
        'ws/tiles/vintage=2024/city=xian/index'
        """
        if vintage is None:
            return self
        return replace(self, vintage=check_name("vintage", vintage))

    def _dated(self, folder: Path) -> Path:
        return folder / f"vintage={self.vintage}" if self.vintage is not None else folder

    @property
    def remote(self) -> str | None:
        """The object-store URI behind the local root, or None for a local workspace."""
        return storage.uri_of(self.root) if storage.is_remote(self.location) else None

    def __fspath__(self) -> str:  # so a Workspace can go wherever a path to its root is expected
        return str(self.root)

    def __str__(self) -> str:
        return str(self.root)

    # -- sync points of a remote workspace (no-ops for a local one) --------------------------------------------------
    @staticmethod
    def fetch(path: str | os.PathLike[str], only_if_missing: bool = False) -> Path:
        """``path`` made present locally (downloaded from the object store when the mirror lacks it or is stale)."""
        return storage.localize(path, only_if_missing=only_if_missing)

    @staticmethod
    def publish(path: str | os.PathLike[str], keep_local: bool = True) -> None:
        """``path`` (file or folder) uploaded to the object store after it was written whole (``keep_local=False``:
        the node's copy is dropped, for files this node will not read again)."""
        storage.publish(path, keep_local=keep_local)

    # -- inputs -----------------------------------------------------------------------------------------------------
    def catalog_candidates(self) -> list[Path]:
        """Where a workspace's own catalog may be, in the order they are looked for."""
        return [self.root / name for name in CATALOG_NAMES]

    @property
    def demo_catalog(self) -> Path:
        return self.root / DEMO_CATALOG

    @property
    def cities(self) -> Path:
        """Demo cities' inputs (``cities/<city>/``)."""
        return self.root / "cities"

    def city_inputs(self, city: str) -> Path:
        return self.cities / check_name("city", city)

    def preview(self, city: str) -> Path:
        return self.root / "preview" / f"{check_name('city', city)}.png"

    def city_imagery(self, city: str) -> Path:
        """``imagery/<city>/``: the VRTs the engine writes to read a city's imagery (a tile mosaic, a tile cache,
        the model input with its bands, stretch and resampling; engine.model_input). Small text files, rewritten
        only when their content changes."""
        return self._dated(self.root / "imagery") / check_name("city", city)

    # -- prepare -----------------------------------------------------------------------------------------------------
    @property
    def tiles(self) -> Path:
        """``tiles/`` (``tiles/vintage=<v>/`` for one vintage of a multi-date catalog)."""
        return self._dated(self.root / "tiles")

    def city_tiles(self, city: str) -> Path:
        """``tiles/city=<city>``: the city's prepared parts (Hive-partitioned, so DuckDB and Arrow read ``city``)."""
        return self.tiles / f"city={check_name('city', city)}"

    def tile_index(self, city: str) -> Path:
        return self.city_tiles(city) / "index"

    def tile_graphs(self, city: str) -> Path:
        return self.city_tiles(city) / "graphs"

    def tiles_glob(self) -> str:
        """Every city's tile index parts, for ``read_parquet(..., hive_partitioning = true)``."""
        return str(self.tiles / "city=*" / "index" / "*.parquet")

    def tiles_marker(self, city: str) -> Path:
        """``tiles/_state/<city>.json``, written last: the completion point readers and reruns trust."""
        return self.tiles / "_state" / f"{check_name('city', city)}.json"

    @property
    def tiles_staging_root(self) -> Path:
        return self.tiles / "_staging"

    def tiles_staging(self, city: str, input_hash: str) -> Path:
        """Where a city is built before it is renamed into place (one folder per input state)."""
        return self.tiles_staging_root / f"{check_name('city', city)}-{input_hash[:12]}"

    @staticmethod
    def staged_part(staging: Path, kind: str, name: str) -> Path:
        """A part built in ``staging``: ``out/index/<name>`` or ``out/graphs/<name>``; ``out`` becomes ``tiles/city=<c>``."""
        if kind not in TILE_PARTS:
            raise ValueError(f"tile part kind {kind!r}: use one of {TILE_PARTS}")
        return Workspace.staged_tiles(staging) / kind / name

    @staticmethod
    def staged_tiles(staging: Path) -> Path:
        return Path(staging) / "out"

    @staticmethod
    def graphs_beside(index_part: str | os.PathLike[str]) -> Path:
        """The graph part holding the same tiles as a tile-index part (same name, sibling folder)."""
        index_part = Path(index_part)
        return index_part.parent.parent / "graphs" / index_part.name

    # -- models ------------------------------------------------------------------------------------------------------
    @property
    def models(self) -> Path:
        return self.root / "models"

    def model(self, name: str) -> Path:
        return self.models / check_name("model", name)

    # -- runs --------------------------------------------------------------------------------------------------------
    @property
    def runs(self) -> Path:
        return self.root / "runs"

    def run(self, run: str) -> RunFolder:
        return RunFolder(self.runs / check_name("run", run))

    def embedding_run(self, run: str, mode: str, level: str) -> RunFolder:
        """``runs/<run>/embeddings/<mode>_<level>/``: one embedding pass (`geolink-engine embed`), a run folder of its
        own (manifest, ledger, parts, ``_done``) beside the map run's files, so it resumes exactly as `map` does."""
        return RunFolder(self.run(run).root / "embeddings" / f"{check_name('mode', mode)}_{check_name('level', level)}")

    def population_run(self, run: str) -> RunFolder:
        """``runs/<run>/population/``: the tile population pass of ``map --population-model`` (a regression model's
        value per tile), a run folder of its own beside the map run's, so it resumes exactly as `map` does."""
        return RunFolder(self.run(run).root / "population")

    @property
    def train_runs(self) -> Path:
        """Ray Train's storage for training runs (checkpoints, results): ``runs/train``."""
        return self.runs / TRAIN_RUNS

    @property
    def logs(self) -> Path:
        """``logs/``: the console output of the commands not tied to a run (prepare, pretrain, finetune)."""
        return self.root / "logs"

    # -- products ----------------------------------------------------------------------------------------------------
    @property
    def products_root(self) -> Path:
        return self.root / "products"

    def products(self, run: str) -> Path:
        """``products/<run>/``; the files inside are named by :mod:`engine.product_layout`."""
        return self.products_root / check_name("run", run)
