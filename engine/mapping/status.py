"""A run's progress while ``map`` runs and after it: ``runs/<run>/status.json``, and `geolink-engine status`.

Why a status file beside the ledger: the ledger (DuckDB) is opened read-write by the driver for the whole inference
pass, and DuckDB allows one process to hold a database file read-write and no other process to open it at all
while it does, not even read-only (duckdb 1.5.5: ``IO Error: Could not set lock on file ... Conflicting lock is held
in <python> (PID n)``, at once, not after a wait). A reader that opened the ledger itself would also, for as long
as it held it, keep a starting or resumed ``map`` from opening it. So:

* the driver (:func:`engine.pipelines.infer.run_inference`) writes ``status.json`` atomically after its ledger
  commits, at most every :data:`STATUS_EVERY_S` seconds, and once more when inference ends; ``map`` records each
  city's stitch outcome in it (:func:`record_stitch`). Per city: tiles planned, ok, failed, stage, a few errors;
  for the run: the pass's start, last update, tiles done in this pass, the recent rate, the driver's pid and host;
* `status` (:func:`read_status`) reads that file. It never opens the ledger read-write and never opens the live
  ledger file at all: when no process holds the ledger (checked with a non-acquiring ``fcntl(F_GETLK)`` probe) it
  copies the ledger to a temporary folder and reads the copy (the committed counts, the truth after a run or a
  killed driver); when the ledger is held, the status file alone answers, with one line saying so.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import shutil
import socket
import struct
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from engine import storage
from engine.atomic import atomic_path
from engine.workspace import TRAIN_RUNS, RunFolder, Workspace, check_name

log = logging.getLogger(__name__)

STATUS_EVERY_S = 2.0  # the driver rewrites status.json at most this often (and at the end of the pass)
PUBLISH_EVERY_S = 30.0  # a remote workspace's status.json is uploaded this often (and at the end)
RATE_WINDOW_S = 60.0  # the rate is measured over the last minute of commits (Ray's start-up does not drag it down)
LIVE_WITHIN_S = 30.0  # a driver on another host counts as live when it wrote the file within this many seconds
MAX_ERRORS = 3  # errors kept per city in the status file (the ledger holds every one)

RUN_FILES = ("run.json", "ledger.duckdb", "status.json")
STAGES = ("prepared", "inferring", "inferred", "stitched", "failed")  # a city's stage, in order


class NoSuchRun(ValueError):
    """A run name with no run folder (the message names the runs present)."""


def _now_iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _write(path: Path, doc: dict, publish: bool) -> None:
    """``doc`` as ``path`` atomically; a failure is logged, never raised (status must not fail a run)."""
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))
        if publish:
            Workspace.publish(path)
    except Exception as exc:  # noqa: BLE001
        log.debug("status file %s not written: %s", path, exc)


class StatusWriter:
    """The driver's side: counts per city as batches are committed, written to ``status.json`` every few seconds.

    ``planned`` (city -> tiles in this pass), ``done_before`` (city -> tiles of them already ok in the ledger),
    ``missing`` (city -> why it has no prepared tiles).
    """

    def __init__(self, folder: RunFolder, planned: dict[str, int], missing: dict[str, str], every_s: float = STATUS_EVERY_S) -> None:
        self.path = folder.status
        self.every_s = every_s
        self.t0 = time.monotonic()
        self.written = self.published = float("-inf")
        self.samples: collections.deque[tuple[float, int]] = collections.deque([(self.t0, 0)])
        self.planned, self.missing = planned, missing
        self.doc: dict = {}

    def start(self, done_before: dict[str, int]) -> None:
        """The pass starts: ``done_before`` (city -> tiles already ok in the ledger) are not predicted again."""
        cities = {}
        for city, n in self.planned.items():
            ok = done_before.get(city, 0)
            cities[city] = {"planned": n, "ok": ok, "failed": 0, "stage": "inferred" if ok >= n else "prepared", "errors": []}
        for city, why in self.missing.items():
            cities[city] = {"planned": 0, "ok": 0, "failed": 0, "stage": "failed", "errors": [["", why]]}
        now = time.time()
        self.t0 = time.monotonic()
        self.samples = collections.deque([(self.t0, 0)])
        self.doc = {"run": self.path.parent.name, "pid": os.getpid(), "host": socket.gethostname(), "phase": "infer",
                    "started_at": now, "updated_at": now, "pass_tiles": sum(self.planned.values()) - sum(done_before.values()),
                    "pass_done": 0, "rate_tiles_s": None, "cities": cities}
        self.write(force=True)

    def __enter__(self) -> StatusWriter:
        return self

    def __exit__(self, exc_type, *_exc) -> None:
        """The pass is over: ``inferred`` (``map`` stitches next), or ``stopped`` when it raised (Ctrl-C included)."""
        if self.doc:
            self.write(force=True, phase="inferred" if exc_type is None else "stopped")

    def commit(self, rows: list[dict]) -> None:
        """Count one committed batch (the ledger's rows: ``city, status, tile_id, error``)."""
        for r in rows:
            c = self.doc["cities"].get(r["city"])
            if c is None:
                continue
            if r["status"] == "ok":
                c["ok"] += 1
            else:
                c["failed"] += 1
                if len(c["errors"]) < MAX_ERRORS:
                    c["errors"].append([r.get("tile_id") or "", r.get("error") or ""])
            c["stage"] = "inferred" if c["ok"] + c["failed"] >= c["planned"] else "inferring"
        self.doc["pass_done"] += len(rows)
        self.write()

    def _rate(self, t: float) -> float | None:
        done = self.doc["pass_done"]
        self.samples.append((t, done))
        while len(self.samples) > 2 and t - self.samples[1][0] >= RATE_WINDOW_S:
            self.samples.popleft()
        t_first, n_first = self.samples[0]
        return (done - n_first) / (t - t_first) if t > t_first and done else None

    def write(self, force: bool = False, phase: str | None = None) -> None:
        t = time.monotonic()
        if not force and t - self.written < self.every_s:
            return
        if phase:
            self.doc["phase"] = phase
        self.doc["rate_tiles_s"] = self._rate(t)
        self.doc["updated_at"] = time.time()
        self.doc["elapsed_s"] = t - self.t0
        publish = force or t - self.published >= PUBLISH_EVERY_S
        _write(self.path, self.doc, publish and storage.uri_of(self.path) is not None)
        self.written = t
        if publish:
            self.published = t

def record_stitch(folder: RunFolder, cities: list) -> None:
    """``map``'s last word on each city (:class:`engine.pipelines.report.CityReport`): ``stitched`` or ``failed`` with
    its stage and error; cities refused before inference (imagery, prepare) are added. Never raises."""
    try:
        path = folder.status
        doc = json.loads(path.read_text()) if path.is_file() else {"run": folder.root.name, "started_at": time.time(), "cities": {}}
        for c in cities:
            entry = doc["cities"].setdefault(c.city, {"planned": c.tiles_ok + c.tiles_failed, "ok": c.tiles_ok,
                                                      "failed": c.tiles_failed, "errors": []})
            if c.status == "failed":
                entry["stage"] = "failed"
                if c.error and not any(e[1].endswith(c.error) for e in entry["errors"]):
                    entry["errors"].insert(0, ["", f"{c.stage}: {c.error}" if c.stage else c.error])
            else:
                entry["stage"] = "stitched"
            if c.tiles_ok + c.tiles_failed:  # from the ledger, as the products were stitched
                entry["ok"], entry["failed"] = c.tiles_ok, c.tiles_failed
        doc.update(phase="stitched", updated_at=time.time(), pid=os.getpid(), host=socket.gethostname())
        _write(path, doc, storage.uri_of(path) is not None)
    except Exception as exc:  # noqa: BLE001 (status is a report: it never fails the run)
        log.debug("status of %s not recorded: %s", folder.root, exc)


# --- reading ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CityStatus:
    city: str
    stage: str
    planned: int
    ok: int
    failed: int
    errors: tuple[tuple[str, str], ...] = ()  # (tile, error): the first few


@dataclass(frozen=True)
class RunStatus:
    """What `status` shows: per city and for the run."""

    run: str
    cities: tuple[CityStatus, ...]
    state: str  # live | finished | stopped | unknown
    phase: str = ""  # infer | inferred | stitched | stopped ('' without a status file)
    rate_tiles_s: float | None = None
    updated_at: float | None = None
    started_at: float | None = None
    source: str = ""  # what answered: 'status file', 'ledger', 'status file + ledger'
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def planned(self) -> int:
        return sum(c.planned for c in self.cities)

    @property
    def done(self) -> int:
        return sum(c.ok + c.failed for c in self.cities)

    @property
    def eta_s(self) -> float | None:
        left = max(0, self.planned - self.done)
        if self.state != "live" or not self.rate_tiles_s or self.phase not in ("infer", ""):
            return None
        return left / self.rate_tiles_s


def list_runs(ws: Workspace) -> list[str]:
    """The map runs of the workspace: folders under ``runs/`` (not Ray Train's) with a manifest, ledger or status file."""
    uri = storage.uri_of(ws.runs)
    if uri is None:
        folders = [p for p in ws.runs.iterdir() if p.is_dir()] if ws.runs.is_dir() else []
        names = [p.name for p in folders if any((p / n).is_file() for n in RUN_FILES)]
    else:
        import pyarrow.fs as pafs

        fs, key = storage.filesystem(uri)
        found = fs.get_file_info(pafs.FileSelector(key, allow_not_found=True))
        names = [Path(i.path).name for i in found if i.type == pafs.FileType.Directory]
    return sorted(n for n in names if n != TRAIN_RUNS and not n.startswith("."))


def ledger_holder(path: Path) -> int | None:
    """The pid of a process holding a lock on the DuckDB file ``path`` (the running driver), 0 when one does but its
    pid is unknown, None when none does. A ``fcntl(F_GETLK)`` probe: it asks, never takes the lock (opening the file
    with DuckDB, even read-only, would take it, and a ``map`` starting meanwhile could not open its ledger).
    Locks held by this very process are not seen (POSIX locks are per process)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: unknown, treated as held (the ledger is then left alone)
        return 0
    fmt = "hhqqi4x"  # struct flock on 64-bit Linux: l_type, l_whence, l_start, l_len, l_pid
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        got = fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack(fmt, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
        kind, _, _, _, pid = struct.unpack(fmt, got)
        return None if kind == fcntl.F_UNLCK else pid
    except (OSError, struct.error):
        return 0
    finally:
        os.close(fd)


def _read_doc(path: Path) -> dict | None:
    """The status file: the local one, or for a remote workspace the newer of the local mirror's and the store's
    (read without touching the mirror, where the driver may be writing)."""
    docs = []
    with contextlib.suppress(OSError, ValueError):  # none yet, or caught mid-replace on a file system without rename
        docs.append(json.loads(path.read_text()))
    uri = storage.uri_of(path)
    if uri is not None:
        with contextlib.suppress(OSError, ValueError):  # the store cannot be reached, or holds none
            fs, key = storage.filesystem(uri)
            with fs.open_input_stream(key) as f:
                docs.append(json.loads(f.read()))
    return max(docs, key=lambda d: d.get("updated_at") or 0) if docs else None


def _snapshot_ledger(path: Path, dest: Path) -> Path | None:
    """A copy of the ledger (and its WAL) in ``dest``: the local file, or for a remote workspace the store's object
    when it is newer than this node's mirror (another node ran the driver). The live file is only read, never opened
    by DuckDB, and the mirror is never overwritten (its driver may be writing it)."""
    target = dest / "ledger.duckdb"
    uri = storage.uri_of(path)
    if uri is not None:
        fs, key = storage.filesystem(uri)
        with contextlib.suppress(OSError):  # the store cannot be reached: this node's copy, if any
            info = fs.get_file_info(key)
            if info.is_file and (not path.is_file() or (info.mtime_ns or 0) > path.stat().st_mtime_ns):
                with fs.open_input_stream(key) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 22)
                return target
    if not path.is_file():
        return None
    shutil.copyfile(path, target)
    wal = path.with_name(path.name + ".wal")
    if wal.is_file():  # commits not yet checkpointed (a driver killed before it closed the ledger)
        shutil.copyfile(wal, target.with_name(target.name + ".wal"))
    return target


def _ledger_counts(path: Path) -> dict[str, tuple[int, int, list[tuple[str, str]]]]:
    """Per city ``(ok, failed, first errors)`` from a snapshot of the ledger (read-only, on a copy)."""
    import duckdb

    con = duckdb.connect(str(path), read_only=True)
    try:
        out = {city: [0, 0, []] for (city,) in con.execute("SELECT DISTINCT city FROM ledger").fetchall()}
        for city, status, n in con.execute("SELECT city, status, count(*) FROM ledger GROUP BY ALL").fetchall():
            out[city][0 if status == "ok" else 1] += n
        for city, tile, error in con.execute(
                "SELECT city, tile_id, error FROM (SELECT *, row_number() OVER (PARTITION BY city ORDER BY tile_id) AS k "
                f"FROM ledger WHERE status = 'failed') WHERE k <= {MAX_ERRORS} ORDER BY city, tile_id").fetchall():
            out[city][2].append((tile, error or ""))
        return {c: (v[0], v[1], v[2]) for c, v in out.items()}
    finally:
        con.close()


def _planned_from_tiles(ws: Workspace, city: str) -> int:
    import pyarrow.parquet as pq

    try:
        return sum(pq.read_metadata(Workspace.fetch(p)).num_rows for p in storage.list_files(ws.tile_index(city), ".parquet"))
    except Exception:  # noqa: BLE001 (a city re-prepared or removed since: unknown)
        return 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _state(doc: dict | None, holder: int | None, now: float) -> str:
    if holder is not None:
        return "live"  # a process holds the ledger: a pass is running
    if doc is None:
        return "unknown"
    if doc.get("phase") in ("stitched", "stopped"):
        return "finished" if doc["phase"] == "stitched" else "stopped"
    if doc.get("host") == socket.gethostname() and doc.get("pid"):
        alive = _pid_alive(int(doc["pid"]))
    else:
        alive = now - (doc.get("updated_at") or 0) < LIVE_WITHIN_S
    if alive:
        return "live"
    return "finished" if doc.get("phase") == "inferred" else "stopped"  # 'infer' with no driver: killed


def read_status(workspace: Workspace | str | os.PathLike[str], run: str, now: float | None = None) -> RunStatus:
    """The run's status, from its status file and (when no process holds it) a copy of its ledger.

    Raises :class:`NoSuchRun` (one line naming the runs present) when ``runs/<run>`` holds no run.
    """
    ws = Workspace.at(workspace)
    now = time.time() if now is None else now
    folder = ws.run(check_name("run", run))
    doc = _read_doc(folder.status)
    ledger_here = folder.ledger.is_file() or (storage.uri_of(folder.ledger) is not None
                                               and folder.ledger in storage.list_files(folder.root, ".duckdb"))
    if doc is None and not ledger_here and not Workspace.fetch(folder.manifest).is_file():
        runs = list_runs(ws)
        raise NoSuchRun(f"no run {run!r} in {ws.runs}; runs present: {', '.join(runs) if runs else 'none'}")
    holder = ledger_holder(folder.ledger) if folder.ledger.is_file() else None
    state = _state(doc, holder, now)
    notes: list[str] = []
    cities: dict[str, CityStatus] = {}
    for city, c in ((doc or {}).get("cities") or {}).items():
        cities[city] = CityStatus(city, c.get("stage", ""), int(c.get("planned", 0)), int(c.get("ok", 0)), int(c.get("failed", 0)),
                                  tuple((e[0], e[1]) for e in c.get("errors", [])))
    source = "status file" if doc is not None else ""
    if holder is not None:
        who = f"process {holder}" if holder else "another process"
        notes.append(f"ledger held by {who} (the running map): counts from the status file"
                     + ("" if doc is not None else " — none written yet (a map from before status files?)"))
    elif ledger_here and (doc is None or state != "live"):
        try:
            with tempfile.TemporaryDirectory(prefix="geolink-status-") as tmp:
                snap = _snapshot_ledger(folder.ledger, Path(tmp))
                counts = _ledger_counts(snap) if snap is not None else {}
            for city, (ok, failed, errors) in counts.items():
                c = cities.get(city)
                if c is None:
                    planned = max(_planned_from_tiles(ws, city), ok + failed)
                    stage = "inferred" if ok + failed >= planned else ("inferring" if state == "live" else "prepared")
                    cities[city] = CityStatus(city, stage, planned, ok, failed, tuple(errors))
                else:  # the ledger is the commit point: its counts win over a file written up to a few seconds before
                    cities[city] = CityStatus(city, c.stage, max(c.planned, ok + failed), ok, failed, tuple(errors) or c.errors)
            source = f"{source} + ledger" if source else "ledger"
        except Exception as exc:  # noqa: BLE001 (a ledger being rewritten as it was copied: the status file answers)
            notes.append(f"ledger not read ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}): counts from the status file")
    if state == "stopped":
        notes.append(f"the driver stopped before the run ended: rerun `geolink-engine map --run {run}` to resume")
    return RunStatus(run=run, cities=tuple(cities[c] for c in sorted(cities)), state=state, phase=(doc or {}).get("phase", ""),
                     rate_tiles_s=(doc or {}).get("rate_tiles_s") if state == "live" else None,
                     updated_at=(doc or {}).get("updated_at"), started_at=(doc or {}).get("started_at"), source=source or "nothing",
                     notes=tuple(notes))


def describe_age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def summary_line(status: RunStatus, now: float | None = None) -> str:
    """One line: done / planned, rate, ETA, live or finished."""
    now = time.time() if now is None else now
    parts = [f"run {status.run}: {status.done} / {status.planned} tiles done"]
    failed = sum(c.failed for c in status.cities)
    if failed:
        parts.append(f"{failed} failed")
    if status.rate_tiles_s:
        parts.append(f"{status.rate_tiles_s:.1f} tiles/s")
    if status.eta_s is not None:
        parts.append(f"ETA {describe_age(status.eta_s)}")
    age = f"updated {describe_age(now - status.updated_at)} ago" if status.updated_at else ""
    state = {"live": f"live ({status.phase or 'running'}{', ' + age if age else ''})",
             "finished": f"finished{' (' + age + ')' if age else ''}",
             "stopped": f"stopped ({age})" if age else "stopped",
             "unknown": "state unknown (no status file; ledger counts)"}[status.state]
    parts.append(state)
    return ", ".join(parts)
