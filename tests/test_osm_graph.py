import numpy as np
import pytest
import shapely

from geolink_model.osm_graph import EDGE_TYPES, GEOM_FEATURES, OsmGraphConfig, build_tile_graph, to_hetero_data, tokenize_tags

CFG = OsmGraphConfig()
TILE = (1000.0, 2000.0, 1200.0, 2200.0)  # a 200 m tile in UTM metres


def _graph(items, cfg=CFG, bounds=TILE):
    geoms = np.array([g for g, _, _ in items], dtype=object)
    kinds = np.array([k for _, k, _ in items])
    tokens = tokenize_tags([t for _, _, t in items], cfg)
    return build_tile_graph(geoms, kinds, tokens, np.arange(len(items), dtype=np.int64), bounds, cfg)


def _edges(graph):
    return {et: sorted(map(tuple, e.T.tolist())) for et, e in graph.edges.items() if e.shape[1]}


def test_known_relations_give_exactly_the_expected_typed_edges():
    a = shapely.box(1010, 2010, 1050, 2050)
    b = shapely.box(1050, 2010, 1090, 2050)  # shares a side with a
    road = shapely.LineString([(1030, 2000), (1030, 2100)])  # crosses a, not b
    shop = shapely.Point(1070, 2030)  # inside b, 40 m from the road
    far = shapely.Point(1190, 2190)
    g = _graph([(a, "polygon", {"building": "yes"}), (b, "polygon", {"building": "yes"}), (road, "line", {"highway": "residential"}),
                (shop, "point", {"shop": "convenience"}), (far, "point", {"amenity": "bench"})])
    assert _edges(g) == {
        ("polygon", "touches", "polygon"): [(0, 1), (1, 0)],
        ("line", "crosses", "polygon"): [(0, 0)],
        ("polygon", "crossed_by", "line"): [(0, 0)],
        ("point", "within", "polygon"): [(0, 1)],
        ("polygon", "contains", "point"): [(1, 0)],
        ("point", "knn", "point"): [(0, 1), (1, 0)],
    }
    # within near_m (15 m) of the road only when the point is close
    g2 = _graph([(road, "line", {"highway": "residential"}), (shapely.Point(1040, 2050), "point", {"shop": "bakery"})])
    assert _edges(g2)[("point", "near", "line")] == [(0, 0)] and _edges(g2)[("line", "near", "point")] == [(0, 0)]


def test_containment_overlap_and_line_intersections():
    outer = shapely.box(1000, 2000, 1100, 2100)
    inner = shapely.box(1020, 2020, 1040, 2040)
    overlapping = shapely.box(1090, 2090, 1150, 2150)
    l1 = shapely.LineString([(1000, 2010), (1200, 2010)])
    l2 = shapely.LineString([(1150, 2000), (1150, 2200)])
    inside_line = shapely.LineString([(1021, 2030), (1039, 2030)])
    g = _graph([(outer, "polygon", {"landuse": "residential"}), (inner, "polygon", {"building": "yes"}), (overlapping, "polygon", {"leisure": "park"}),
                (l1, "line", {"highway": "primary"}), (l2, "line", {"highway": "secondary"}), (inside_line, "line", {"highway": "footway"})])
    e = _edges(g)
    assert e[("polygon", "contains", "polygon")] == [(0, 1)] and e[("polygon", "within", "polygon")] == [(1, 0)]
    assert e[("polygon", "overlaps", "polygon")] == [(0, 2), (2, 0)]
    assert e[("line", "intersects", "line")] == [(0, 1), (1, 0)]
    assert e[("line", "within", "polygon")] == [(2, 0), (2, 1)]
    assert (0, 0) in e[("line", "crosses", "polygon")] and (0, 2) not in e[("line", "crosses", "polygon")]


def test_positions_are_normalised_like_image_rows_and_columns():
    top_left_house = shapely.box(1010, 2160, 1040, 2190)  # x in the left quarter, y near the top
    g = _graph([(top_left_house, "polygon", {"building": "yes"}), (shapely.Point(1190, 2010), "point", {"shop": "kiosk"})])
    poly = dict(zip(GEOM_FEATURES["polygon"], g.nodes["polygon"].geom[0]))
    assert poly["cx"] == pytest.approx(0.125) and poly["cy"] == pytest.approx(0.125)
    assert poly["xmin"] == pytest.approx(0.05) and poly["ymin"] == pytest.approx(0.05) and poly["ymax"] == pytest.approx(0.2)
    assert poly["area"] == pytest.approx(900 / 40000) and poly["compactness"] == pytest.approx(np.pi / 4)
    point = g.nodes["point"].geom[0]
    assert point[0] == pytest.approx(0.95) and point[1] == pytest.approx(0.95)  # bottom right


def test_shape_descriptors_of_lines_and_long_polygons():
    slab = shapely.box(1000, 2000, 1080, 2010)  # 80 x 10 m, east-west
    road = shapely.LineString([(1000, 2000), (1100, 2100)])  # diagonal
    g = _graph([(slab, "polygon", {"building": "apartments"}), (road, "line", {"highway": "primary"})])
    poly = dict(zip(GEOM_FEATURES["polygon"], g.nodes["polygon"].geom[0]))
    assert poly["elongation"] == pytest.approx(1 - 10 / 80) and poly["cos2"] == pytest.approx(1.0)
    line = dict(zip(GEOM_FEATURES["line"], g.nodes["line"].geom[0]))
    assert line["length"] == pytest.approx(np.hypot(100, 100) / 200) and line["straightness"] == pytest.approx(1.0)
    assert line["cos2"] == pytest.approx(0.0, abs=1e-6) and line["sin2"] == pytest.approx(1.0)


def test_empty_tile_is_a_valid_graph():
    g = _graph([])
    assert g.num_nodes() == 0 and g.num_edges() == 0
    data = to_hetero_data(g)
    assert data["polygon"].x.shape == (0, len(GEOM_FEATURES["polygon"])) and data["point"].tokens.shape == (0, CFG.tokens_per_node)
    assert all(data[et].edge_index.shape == (2, 0) for et in EDGE_TYPES)


def test_cap_keeps_the_largest_deterministically():
    cfg = OsmGraphConfig(max_nodes={"point": 2, "line": 2, "polygon": 3})
    boxes = [(shapely.box(1000 + 20 * i, 2000, 1000 + 20 * i + 1 + i, 2000 + 1 + i), "polygon", {"building": "yes"}) for i in range(8)]
    points = [(shapely.Point(1100 + i, 2100), "point", {"shop": "x"}) for i in range(5)]
    g = _graph(boxes + points, cfg)
    assert g.nodes["polygon"].osm_id.tolist() == [5, 6, 7]  # the three largest, in input order
    assert g.nodes["point"].osm_id.tolist() == [8, 9]  # equal size: lowest ids
    assert _graph(boxes + points, cfg).nodes["polygon"].geom.tobytes() == g.nodes["polygon"].geom.tobytes()


def test_tokens_are_stable_hashed_and_skip_free_text_values():
    cfg = OsmGraphConfig(vocab_size=1 << 12, tokens_per_node=6)
    a = tokenize_tags([{"building": "yes", "name": "Shipai Village"}, [("name", "Other"), ("building", "yes")]], cfg)
    assert (a[0] == a[1]).all(), "name values are free text: only the key is a token"
    assert ((a > 0) & (a < cfg.vocab_size)).sum(axis=1).tolist() == [3, 3]
    b = tokenize_tags([{"building": "house"}], cfg)
    assert b[0, 0] == a[0, 0] and b[0, 1] != a[0, 1]  # same key token, different key=value token
    many = tokenize_tags([{f"k{i}": "v" for i in range(10)}], cfg)
    assert (many > 0).sum() == cfg.tokens_per_node


def test_hetero_data_carries_features_and_edges():
    g = _graph([(shapely.box(1010, 2010, 1050, 2050), "polygon", {"building": "yes"}), (shapely.Point(1020, 2020), "point", {"shop": "x"})])
    data = to_hetero_data(g)
    assert data["polygon"].x.shape == (1, len(GEOM_FEATURES["polygon"]))
    assert data["point", "within", "polygon"].edge_index.tolist() == [[0], [0]]
    assert int(data["polygon"].tokens[0, 0]) > 0


def test_batched_relations_equal_pairwise_predicates_on_random_tiles():
    """Many random tiles built in one batch give exactly the edges of shapely predicates evaluated pair by pair."""
    from geolink_model.osm_graph import build_tile_graphs

    rng = np.random.default_rng(3)
    geoms, kinds, tiles, bounds = [], [], [], []
    for t in range(12):
        x0, y0 = 1000.0 + 150 * t, 2000.0  # overlapping windows: copies near borders must not mix across tiles
        bounds.append((x0, y0, x0 + 200, y0 + 200))
        for _ in range(rng.integers(0, 30) if t else 0):  # tile 0 stays empty
            cx, cy = x0 + rng.uniform(0, 200), y0 + rng.uniform(0, 200)
            kind = rng.choice(["point", "line", "polygon"])
            if kind == "point":
                g = shapely.Point(round(cx), round(cy))
            elif kind == "line":
                g = shapely.LineString([(round(cx), round(cy)), (round(cx + rng.uniform(-80, 80)), round(cy + rng.uniform(-80, 80)))])
            else:
                w, h = rng.integers(5, 60, size=2)
                g = shapely.box(round(cx), round(cy), round(cx) + w, round(cy) + h)  # integer grid: touching happens
            geoms.append(g.intersection(shapely.box(*bounds[-1])))
            kinds.append(kind)
            tiles.append(t)
    geoms, kinds, tiles = np.array(geoms, dtype=object), np.array(kinds), np.array(tiles)
    keep = ~shapely.is_empty(geoms) & ~((kinds == "polygon") & (shapely.area(geoms) == 0))
    geoms, kinds, tiles = geoms[keep], kinds[keep], tiles[keep]
    cfg = OsmGraphConfig(max_nodes={"point": 999, "line": 999, "polygon": 999})
    graphs = build_tile_graphs(geoms, kinds, np.ones((len(geoms), 2), np.int32), np.arange(len(geoms)), tiles, np.array(bounds), cfg)
    checks = {
        ("polygon", "touches", "polygon"): shapely.touches, ("polygon", "overlaps", "polygon"): shapely.overlaps,
        ("polygon", "contains", "polygon"): shapely.contains, ("polygon", "within", "polygon"): shapely.within,
        ("line", "crosses", "polygon"): shapely.crosses, ("line", "within", "polygon"): shapely.within,
        ("polygon", "contains", "line"): shapely.contains, ("line", "intersects", "line"): shapely.intersects,
        ("point", "within", "polygon"): shapely.within, ("polygon", "contains", "point"): shapely.contains,
        ("point", "near", "line"): lambda a, b: shapely.dwithin(a, b, cfg.near_m),
    }
    total = 0
    for t, graph in enumerate(graphs):
        for (src, rel, dst), predicate in checks.items():
            a = geoms[(tiles == t) & (kinds == src)]
            b = geoms[(tiles == t) & (kinds == dst)]
            expected = {(i, j) for i in range(len(a)) for j in range(len(b)) if not (src == dst and i == j) and predicate(a[i], b[j])}
            assert set(map(tuple, graph.edges[(src, rel, dst)].T.tolist())) == expected, (t, src, rel, dst)
            total += len(expected)
    assert total > 30  # the random tiles do exercise the relations
