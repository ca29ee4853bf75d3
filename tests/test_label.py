"""`geolink-engine label` without a browser: the labels store, its HTTP API, the export `assess` reads, and Cohen's
kappa with an interval whose coverage is measured."""

from __future__ import annotations

import io
import json
import shutil
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pyogrio
import pytest
from PIL import Image

from engine.accuracy.assess import AssessConfig, run_assess
from engine.accuracy.reference import read_labels
from engine.accuracy.sampling import LAND_CLASSES, SampleConfig
from engine.web import label as label_mod
from engine.web.label import (
    LabelFileError,
    LabelInputError,
    LabelStore,
    agreement,
    cohen_kappa,
    export_reference,
    kappa_interval,
    make_label_server,
)
from tests.browser import serving
from tests.test_accuracy_assess import RUN, _workspace

CFG = AssessConfig(sampling=SampleConfig(min_rare=5, min_common=5, n_total=60, seed=11), chip_px=32)


@pytest.fixture(scope="module")
def assessed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """A workspace whose run awaits labels (no catalog reference): ``products/r1/accuracy/samples.gpkg``."""
    ws = tmp_path_factory.mktemp("label")
    catalog = _workspace(ws, with_reference=False)
    report = run_assess(ws, RUN, catalog, CFG)
    assert report.status == "awaiting_labels"
    return ws, catalog.to_pylist()


@pytest.fixture
def products(assessed, tmp_path: Path) -> Path:
    """A private copy of the run's products (each test writes its own labels)."""
    ws, _ = assessed
    out = tmp_path / "products" / RUN
    shutil.copytree(ws / "products" / RUN, out)
    return out


@pytest.fixture
def served(products: Path, assessed):
    """The labelling server of the copy, serving in a thread; city c's imagery is unreadable."""
    _, rows = assessed
    rows = [{**r, "imagery": str(products / "missing.tif")} if r["city"] == "c" else r for r in rows]
    server = make_label_server(products, rows)
    with serving(server) as base:
        yield server, base


def _request(url: str, body: bytes | None = None, headers: dict | None = None, method: str | None = None):
    """(status, headers, body bytes) of one request, errors included."""
    req = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def _post(base: str, path: str, doc: object, **headers):
    return _request(base + path, json.dumps(doc).encode(), {"Content-Type": "application/json", **headers})


def _error(body: bytes) -> str:
    doc = json.loads(body)
    assert set(doc) == {"error"} and "\n" not in doc["error"] and doc["error"]
    return doc["error"]


# ---------------------------------------------------------------------------------------------------------------
# store


def test_store_round_trip_and_resume(products: Path) -> None:
    store = LabelStore(products)
    ids = store.ids
    assert len(ids) == 60 and ids == sorted(ids)
    store.save("alice", ids[0], "urban_village")
    store.save("alice", ids[1], "other", unsure=True, comment="roof,\n\"shed\"")
    store.save("alice", ids[3], "built_up")
    store.save("alice", ids[0], "built_up")  # a changed answer replaces the first
    again = LabelStore(products)  # a restarted server reads the same
    answers = again.answers("alice")
    assert {i: a.label for i, a in answers.items()} == {ids[0]: "built_up", ids[1]: "other", ids[3]: "built_up"}
    assert answers[ids[1]].unsure and answers[ids[1]].comment == 'roof, "shed"'  # one line per row
    assert again.progress("alice") == {"labelled": 3, "total": 60, "first_unlabelled": ids[2]}
    csv_path = products / "accuracy" / "labels" / "alice.csv"
    table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    assert list(table.columns) == ["id", "city", "lon", "lat", "label", "unsure", "comment", "labelled_at"]
    assert table["id"].tolist() == [ids[0], ids[1], ids[3]]  # sample order
    assert again.labellers() == ["alice"] and again.progress("bob")["labelled"] == 0


def test_a_failed_write_leaves_the_old_file(products: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LabelStore(products)
    store.save("alice", store.ids[0], "other")
    path = store.path("alice")
    before = path.read_bytes()

    def killed(_fd: int) -> None:  # the process dies between writing the temporary file and the rename
        raise OSError("killed")

    monkeypatch.setattr(label_mod.os, "fsync", killed)
    with pytest.raises(OSError, match="killed"):
        store.save("alice", store.ids[1], "built_up")
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [".lock", "alice.csv"]  # no temporary file left


def test_concurrent_saves_keep_every_answer(products: Path) -> None:
    store = LabelStore(products)
    threads = [threading.Thread(target=store.save, args=("alice", i, LAND_CLASSES[k % 3])) for k, i in enumerate(store.ids[:24])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(LabelStore(products).answers("alice")) == 24


def test_bad_answers_are_refused_with_one_line(products: Path) -> None:
    store = LabelStore(products)
    cases = [(("../x", store.ids[0], "other"), "labeller name '../x' is not a valid slug"),
             (("alice", "p99999", "other"), "id 'p99999' is not a point"),
             (("alice", store.ids[0], "village"), "label 'village' is not one of"),
             (("alice", store.ids[0], "other", "yes"), "unsure 'yes' must be true or false"),
             (("alice", store.ids[0], "other", False, "x" * 1001), "comment has 1001 characters")]
    for args, message in cases:
        with pytest.raises(LabelInputError, match=message.replace("(", r"\(")):
            store.save(*args)
    assert not store.folder.exists() or not list(store.folder.glob("*.csv"))


def test_a_labels_file_of_another_draw_is_refused(products: Path) -> None:
    store = LabelStore(products)
    store.folder.mkdir(parents=True)
    point = store.public_points()[0]
    (store.folder / "old.csv").write_text(f"id,lon,lat,label\n{point['id']},{point['lon'] + 0.01:.8f},{point['lat']:.8f},other\n")
    with pytest.raises(LabelFileError, match=r"old.csv: line 2: .*another draw"):
        store.answers("old")
    (store.folder / "old.csv").write_text("id,label\np99999,other\n")
    with pytest.raises(LabelFileError, match="p99999"):
        store.answers("old")


def test_a_map_run_takes_no_after_rows(products: Path, assessed) -> None:
    _, rows = assessed
    with pytest.raises(ValueError, match="is a map run .*after_rows are for a change run only"):
        make_label_server(products, rows, after_rows=rows)


def test_missing_sample_names_the_run_and_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "r9").mkdir()
    with pytest.raises(FileNotFoundError, match=r"run r9: .*samples.gpkg; run `geolink-engine assess --run r9` first"):
        make_label_server(tmp_path / "r9", [])


# ---------------------------------------------------------------------------------------------------------------
# export


def test_export_is_what_assess_reads(assessed, products: Path, tmp_path: Path) -> None:
    store = LabelStore(products)
    with pytest.raises(LabelInputError, match="has labelled no point"):
        export_reference(products, "alice")
    for k, i in enumerate(store.ids[:-1]):
        store.save("alice", i, LAND_CLASSES[k % 3], unsure=k == 2, comment="edge" if k == 4 else "")
    with pytest.raises(LabelInputError, match=f"1 of 60 points of run {RUN} have no label yet"):
        export_reference(products, "alice")
    assert read_labels(export_reference(products, "alice", partial=True), store.sample, required=set()).shape[0] == 59
    store.save("alice", store.ids[-1], "other")
    path = export_reference(products, "alice")
    assert path == products / "accuracy" / "labels" / "alice.reference.csv"
    assert list(pd.read_csv(path).columns) == ["id", "city", "lon", "lat", "label", "unsure", "comment"]
    sample = pyogrio.read_dataframe(products / "accuracy" / "samples.gpkg", read_geometry=False)
    labels = read_labels(path, sample)
    assert len(labels) == 60 and set(labels["ref_land"]) == set(LAND_CLASSES)
    assert store.labellers() == ["alice"]  # the export is not taken for a labeller
    # and the assessment itself takes it (a copy of the workspace: run_assess rewrites accuracy/)
    ws, rows = assessed
    ws2 = tmp_path / "ws"
    shutil.copytree(ws, ws2)
    from tests.test_accuracy_assess import _catalog

    done = run_assess(ws2, RUN, _catalog(rows), CFG, reference_labels=path)
    assert done.status == "done" and (done.points["ref_source"] == "labels").all()


# ---------------------------------------------------------------------------------------------------------------
# HTTP


def test_http_round_trip_and_blindness(served) -> None:
    _, base = served
    status, headers, body = _request(base + "/api/samples")
    assert status == 200 and headers["Content-Type"] == "application/json"
    doc = json.loads(body)
    assert len(doc["points"]) == 60 and doc["classes"] == list(LAND_CLASSES)
    assert doc["kind"] == "map" and doc["vintages"] is None  # one date: no change-run views
    assert [(b["class"], b["keys"]) for b in doc["buttons"]] == [("urban_village", ["1", "u"]), ("built_up", ["2", "b"]),
                                                                ("other", ["3", "o"])]
    assert all(set(p) == {"id", "city", "lon", "lat", "note"} for p in doc["points"])
    text = body.decode()
    for hidden in ("map_class", "stratum", "ref_", "region", "east", "west"):
        assert hidden not in text, f"{hidden!r} reaches the browser"
    first = doc["points"][0]["id"]
    status, _, body = _post(base, "/api/labels", {"labeller": "alice", "id": first, "label": "urban_village",
                                                  "unsure": True, "comment": "courtyards", "version": doc["version"]})
    assert status == 200 and json.loads(body)["labelled"] == 1
    status, _, body = _request(base + "/api/labels?labeller=alice")
    got = json.loads(body)
    assert got["answers"][first]["label"] == "urban_village" and got["answers"][first]["unsure"]
    assert got["first_unlabelled"] == doc["points"][1]["id"] and got["total"] == 60
    assert json.loads(_request(base + "/api/labellers")[2]) == {"labellers": [{"name": "alice", "labelled": 1}]}
    status, headers, page = _request(base + "/?labeller=alice")
    assert status == 200 and b"label.js" in page and "default-src 'self'" in headers["Content-Security-Policy"]


def test_http_refuses_bad_input(served) -> None:
    server, base = served
    store = server.label_app.store
    pid = store.ids[0]
    cases = [({"labeller": "alice", "id": "p99999", "label": "other"}, 400, "not a point"),
             ({"labeller": "alice", "id": pid, "label": "slum"}, 400, "is not one of"),
             ({"labeller": "Alice", "id": pid, "label": "other"}, 400, "not a valid slug"),
             ({"labeller": "../x", "id": pid, "label": "other"}, 400, "not a valid slug"),
             ({"labeller": "alice", "id": pid, "label": "other", "comment": "x" * 1001}, 400, "at most 1000"),
             ({"labeller": "alice", "id": pid, "label": "other", "extra": 1}, 400, "unknown field"),
             ({"labeller": "alice", "id": pid, "label": "other", "version": "old"}, 409, "reload the page")]
    for doc, code, message in cases:
        status, _, body = _post(base, "/api/labels", doc)
        assert status == code and message in _error(body), (doc, status, body)
    assert _request(base + "/api/labels", b"[1]", {"Content-Type": "application/json"})[0] == 400
    assert _request(base + "/api/labels", b"{oops", {"Content-Type": "application/json"})[0] == 400
    assert _request(base + "/api/labels", b"id=1", {"Content-Type": "application/x-www-form-urlencoded"})[0] == 415
    assert _request(base + "/api/labels", b"{}" + b" " * 20_000, {"Content-Type": "application/json"})[0] == 413
    assert _post(base, "/api/labels", {"labeller": "alice", "id": pid, "label": "other"},
                 Origin="http://evil.example")[0] == 403
    assert _request(base + "/api/samples", headers={"Host": "evil.example"})[0] == 403  # DNS rebinding
    assert _request(base + "/api/labels")[0] == 400  # no ?labeller=
    assert _request(base + "/api/nothing")[0] == 404
    assert _post(base, "/api/nothing", {})[0] == 404
    for path in ("/..%2f..%2fetc/passwd", "/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/chip/..%2f..%2fetc.png",
                 "/chip/p99999.png", "/.lock", f"/chip-after/{pid}.png", f"/context-after/{pid}.png"):  # one date only
        assert _request(base + path)[0] == 404, path
    assert not store.folder.exists()  # nothing was written by any of these


def test_a_write_cannot_leave_the_runs_labels(served, products: Path) -> None:
    server, base = served
    before = {p for p in products.parent.parent.rglob("*")}
    pid = server.label_app.store.ids[0]
    for name in ("../x", "..", "a/b", "/tmp/x", "x.y", "", None, 5, "a" * 64):
        status, _, _ = _post(base, "/api/labels", {"labeller": name, "id": pid, "label": "other"})
        assert status == 400, name
    assert _post(base, "/api/labels", {"labeller": "ok", "id": pid, "label": "other"})[0] == 200
    added = {p for p in products.parent.parent.rglob("*")} - before
    labels = products / "accuracy" / "labels"
    assert added == {labels, labels / ".lock", labels / "ok.csv"}


def test_chips_and_an_unreadable_city(served) -> None:
    _, base = served
    doc = json.loads(_request(base + "/api/samples")[2])
    good = next(p for p in doc["points"] if p["city"] != "c")
    bad = next(p for p in doc["points"] if p["city"] == "c")
    assert good["note"] == "" and "no imagery" in bad["note"] and "missing.tif" in bad["note"]
    status, headers, body = _request(f"{base}/chip/{good['id']}.png")
    assert status == 200 and headers["Content-Type"] == "image/png"
    assert Image.open(io.BytesIO(body)).size == (label_mod.CHIP_PX, label_mod.CHIP_PX)
    context = Image.open(io.BytesIO(_request(f"{base}/context/{good['id']}.png")[2]))
    assert context.size == (label_mod.CONTEXT_PX, label_mod.CONTEXT_PX)
    rgb = np.asarray(context.convert("RGB"))
    assert ((rgb == (255, 255, 0)).all(axis=-1)).sum() > 100  # the chip's box is drawn
    status, _, body = _request(f"{base}/chip/{bad['id']}.png")  # a placeholder, not an error
    assert status == 200 and Image.open(io.BytesIO(body)).size[0] > 0


def test_agreement_over_http(served) -> None:
    server, base = served
    store = server.label_app.store
    for k, pid in enumerate(store.ids[:30]):
        store.save("alice", pid, LAND_CLASSES[k % 3])
        store.save("bob", pid, LAND_CLASSES[k % 3] if k % 5 else LAND_CLASSES[(k + 1) % 3])
    store.save("bob", store.ids[40], "other")
    doc = json.loads(_request(base + "/api/agreement?a=alice&b=bob")[2])
    assert doc["n"] == 30 and doc["n_a"] == 30 and doc["n_b"] == 31
    assert doc["observed_agreement"] == pytest.approx(24 / 30) and len(doc["disagreements"]) == 6
    assert doc["kappa_lo"] < doc["kappa"] < doc["kappa_hi"] and doc["kappa"] == pytest.approx(0.7, abs=1e-9)
    assert agreement(store.products_dir, "alice", "bob") == doc
    assert _request(base + "/api/agreement?a=alice&b=alice")[0] == 400
    assert _request(base + "/api/agreement?a=alice&b=../x")[0] == 400


# ---------------------------------------------------------------------------------------------------------------
# kappa


def _table(pairs: dict[tuple[int, int], int]) -> np.ndarray:
    t = np.zeros((3, 3), int)
    for (i, j), n in pairs.items():
        t[i, j] = n
    return t


def test_kappa_on_known_tables() -> None:
    perfect = np.diag([20, 15, 5])
    assert cohen_kappa(perfect) == 1.0
    lo, hi = kappa_interval(perfect)
    assert hi == 1.0 and 0.8 < lo < 1.0  # never zero width, even without a disagreement
    assert cohen_kappa(_table({(0, 0): 20, (0, 1): 5, (1, 0): 10, (1, 1): 15})) == pytest.approx(0.4)  # Cohen 1960 style
    assert cohen_kappa(_table({(0, 1): 10, (1, 0): 10})) == pytest.approx(-1.0)
    assert cohen_kappa(_table({(0, 0): 12})) is None  # one class only: chance agreement is 1
    assert cohen_kappa(np.zeros((3, 3))) is None
    lo, hi = kappa_interval(_table({(0, 0): 12}))
    assert -1 <= lo < hi <= 1
    table = _table({(0, 0): 30, (0, 1): 3, (1, 0): 2, (1, 1): 12, (2, 2): 8, (2, 0): 1})
    lo, hi = kappa_interval(table)
    assert lo < cohen_kappa(table) < hi and kappa_interval(table) == (lo, hi)  # seeded: the same every time


@pytest.mark.parametrize("truth", [
    [[.30, .03, .02], [.02, .25, .03], [.02, .03, .30]],  # balanced, kappa 0.78
    [[.60, .01, .04], [.01, .06, .01], [.04, .01, .22]],  # rare urban villages, kappa 0.76
    [[.50, .01, .01], [.005, .15, .005], [.01, .01, .31]],  # near-perfect agreement, kappa 0.92
], ids=["balanced", "rare-uv", "near-perfect"])
def test_kappa_interval_holds_its_coverage(truth: list[list[float]]) -> None:
    """Two labellers' answers drawn from a known table: the 95% interval covers the true kappa 90-99% of the time
    (300 replicates of n = 60; the band allows for the simulation's own error, about 1.3 points)."""
    p = np.array(truth) / np.sum(truth)
    po, pe = np.trace(p), float(p.sum(0) @ p.sum(1))
    true_kappa = (po - pe) / (1 - pe)
    rng = np.random.default_rng(60)
    tables = rng.multinomial(60, p.ravel(), size=300).reshape(-1, 3, 3)
    hits = [lo <= true_kappa <= hi for lo, hi in (kappa_interval(t, draws=2000) for t in tables)]
    assert 0.90 <= np.mean(hits) <= 0.99, np.mean(hits)
