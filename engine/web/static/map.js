// The interactive map of a run's products (map.html): UV polygons (GeoJSON per city or one PMTiles archive),
// per-city UV probability and imagery overlays, a click popup with the village's attributes, a city list.
// Everything it loads lies in the products folder; the manifest is inlined in map.html.
// For tests and scripts: window.geolinkMap = {map, ready, loaded, rendered(), error}.
"use strict";
(function () {
  const M = JSON.parse(document.getElementById("geolink-manifest").textContent);
  const status = document.getElementById("status");
  const state = { map: null, ready: false, loaded: 0, error: null, rendered: () => 0 };
  window.geolinkMap = state;
  const abs = (rel) => new URL(rel, window.location.href).href;
  const say = (text) => { status.textContent = text; };

  const map = new maplibregl.Map({
    container: "map",
    style: { version: 8, sources: {}, layers: [{ id: "background", type: "background", paint: { "background-color": "#20232a" } }] },
    bounds: [[M.bounds[0], M.bounds[1]], [M.bounds[2], M.bounds[3]]],
    fitBoundsOptions: { padding: 40 },
    attributionControl: false,
  });
  state.map = map;
  map.addControl(new maplibregl.NavigationControl({ showCompass: false }), "top-right");
  map.addControl(new maplibregl.ScaleControl({ unit: "metric" }), "bottom-right");
  map.on("error", (ev) => { state.error = String((ev && ev.error && ev.error.message) || ev); console.error(state.error); });

  // --- overlays: added for the cities in view, so a national run does not load hundreds of pictures at once ---
  const added = new Set();
  function addOverlays() {
    const b = map.getBounds();
    const visible = M.cities.filter((c) => c.bounds && !(c.bounds[2] < b.getWest() || c.bounds[0] > b.getEast() ||
      c.bounds[3] < b.getSouth() || c.bounds[1] > b.getNorth()));
    if (visible.length > 40) return; // national view: the polygons alone
    for (const c of visible) {
      for (const kind of ["imagery", "probability"]) {
        const o = c.overlays[kind];
        const id = `${kind}-${c.city}`;
        if (!o || added.has(id)) continue;
        added.add(id);
        map.addSource(id, { type: "image", url: abs(o.url), coordinates: o.coordinates });
        const layer = { id, type: "raster", source: id, paint: { "raster-opacity": kind === "imagery" ? 1 : 0.45, "raster-fade-duration": 0 },
                        layout: { visibility: document.getElementById(kind === "imagery" ? "show-imagery" : "show-prob").checked ? "visible" : "none" } };
        // bottom to top: imagery, probability, villages (fill, outline)
        const before = kind === "imagery" ? firstOverlay("probability") || "uv-fill" : "uv-fill";
        map.addLayer(layer, map.getLayer(before) ? before : undefined);
      }
    }
  }
  function firstOverlay(kind) {
    const layer = map.getStyle().layers.find((l) => l.id.startsWith(kind + "-"));
    return layer ? layer.id : null;
  }

  // --- the villages ---
  function addVillages() {
    const paintFill = { "fill-color": "#00e5ff", "fill-opacity": 0.25 };
    const paintLine = { "line-color": "#00e5ff", "line-width": 1.5 };
    if (M.vector.kind === "pmtiles") {
      const protocol = new pmtiles.Protocol();
      maplibregl.addProtocol("pmtiles", protocol.tile);
      map.addSource("uv", { type: "vector", url: "pmtiles://" + abs(M.vector.url) });
      map.addLayer({ id: "uv-fill", type: "fill", source: "uv", "source-layer": M.vector.layer, paint: paintFill }, "city-points");
      map.addLayer({ id: "uv-line", type: "line", source: "uv", "source-layer": M.vector.layer, paint: paintLine }, "city-points");
      state.loaded = M.villages;
      return Promise.resolve();
    }
    map.addSource("uv", { type: "geojson", data: { type: "FeatureCollection", features: [] } });
    map.addLayer({ id: "uv-fill", type: "fill", source: "uv", paint: paintFill }, "city-points");
    map.addLayer({ id: "uv-line", type: "line", source: "uv", paint: paintLine }, "city-points");
    const files = Object.values(M.vector.files);
    return Promise.all(files.map((f) => fetch(abs(f)).then((r) => {
      if (!r.ok) throw new Error(`${f}: HTTP ${r.status}`);
      return r.json();
    }))).then((parts) => {
      const features = parts.flatMap((p) => p.features);
      map.getSource("uv").setData({ type: "FeatureCollection", features });
      state.loaded = features.length;
    });
  }

  function fmt(value, col) {
    if (value === null || value === undefined || value === "" || (typeof value === "number" && !isFinite(value))) return "—";
    if (typeof value === "number" && col.digits !== null) {
      return value.toLocaleString("en", { maximumFractionDigits: col.digits, minimumFractionDigits: col.digits }) + (col.unit ? " " + col.unit : "");
    }
    return String(value) + (col.unit ? " " + col.unit : "");
  }
  function popupNode(props) {
    const table = document.createElement("table");
    table.className = "attrs";
    for (const col of M.columns) {
      const tr = table.insertRow();
      const th = document.createElement("th");
      th.textContent = col.label;
      tr.appendChild(th);
      tr.insertCell().textContent = fmt(props[col.name], col);
    }
    return table;
  }

  // --- the city list ---
  function cityList() {
    const list = document.getElementById("cities");
    const filter = document.getElementById("filter");
    for (const c of M.cities) {
      const li = document.createElement("li");
      li.dataset.city = c.city;
      if (c.failed) li.classList.add("failed");
      const share = c.uv_share === null || c.uv_share === undefined ? "" : ` · ${(100 * c.uv_share).toFixed(1)}%`;
      li.innerHTML = "<b></b><span></span>";
      li.querySelector("b").textContent = c.city;
      li.querySelector("span").textContent = ` ${c.region}${share} · ${c.polygons} villages${c.failed ? " · failed" : ""}${c.note ? " · " + c.note : ""}`;
      li.title = c.note || "";
      li.addEventListener("click", () => zoomTo(c.city));
      list.appendChild(li);
    }
    filter.addEventListener("input", () => {
      const q = filter.value.trim().toLowerCase();
      for (const li of list.children) li.hidden = q !== "" && !li.textContent.toLowerCase().includes(q);
    });
  }

  function legend() {
    const el = document.getElementById("legend");
    const ramp = M.prob_legend.colours.join(",");
    el.innerHTML = `<div class="ramp" style="background: linear-gradient(to right, ${ramp})"></div>` +
      `<div class="ticks"><span>${M.prob_legend.min_shown}</span><span>UV probability</span><span>1</span></div>` +
      '<div class="swatch"><i></i> UV polygon (click for attributes)</div>' +
      '<div class="cities">cities, UV share of built-up land: <i style="background:#2c7bb6"></i>0 ' +
      '<i style="background:#ffffbf"></i>10% <i style="background:#d7191c"></i>30%+ <i style="background:#000000"></i>failed</div>';
  }

  function toggle(box, prefix) {
    document.getElementById(box).addEventListener("change", (ev) => {
      for (const l of map.getStyle().layers) {
        if (prefix.some((p) => l.id.startsWith(p))) map.setLayoutProperty(l.id, "visibility", ev.target.checked ? "visible" : "none");
      }
    });
  }

  // --- the national view: one point per city (cities are a few pixels wide there), coloured by UV share ---
  function addCityPoints() {
    const features = M.cities.filter((c) => c.bounds).map((c) => ({
      type: "Feature",
      geometry: { type: "Point", coordinates: [(c.bounds[0] + c.bounds[2]) / 2, (c.bounds[1] + c.bounds[3]) / 2] },
      properties: { city: c.city, uv_share: c.uv_share === null || c.uv_share === undefined ? -1 : c.uv_share, failed: c.failed },
    }));
    map.addSource("city-points", { type: "geojson", data: { type: "FeatureCollection", features } });
    map.addLayer({
      id: "city-points", type: "circle", source: "city-points", maxzoom: 10,
      paint: {
        "circle-radius": 7, "circle-stroke-color": "#ffffff", "circle-stroke-width": 1.5,
        "circle-color": ["case", ["get", "failed"], "#000000", ["<", ["get", "uv_share"], 0], "#9e9e9e",
          ["interpolate", ["linear"], ["get", "uv_share"], 0, "#2c7bb6", 0.1, "#ffffbf", 0.3, "#d7191c"]],
      },
    });
    map.on("click", "city-points", (ev) => zoomTo(ev.features[0].properties.city));
    map.on("mouseenter", "city-points", () => { map.getCanvas().style.cursor = "pointer"; });
    map.on("mouseleave", "city-points", () => { map.getCanvas().style.cursor = ""; });
  }
  function zoomTo(city) {
    const c = M.cities.find((x) => x.city === city);
    if (c && c.bounds) map.fitBounds([[c.bounds[0], c.bounds[1]], [c.bounds[2], c.bounds[3]]], { padding: 30, duration: 0 });
    for (const li of document.getElementById("cities").children) li.classList.toggle("current", li.dataset.city === city);
  }
  state.zoomTo = zoomTo;

  cityList();
  legend();
  if (window.location.protocol === "file:") {
    say("Opened from disk: browsers refuse to read the village files from file:// pages. Run `geolink-engine serve --run " +
        M.run + "` and open the address it prints.");
  }
  map.on("load", () => {
    addCityPoints();
    say("loading villages…");
    addVillages().then(() => {
      addOverlays();
      map.on("moveend", addOverlays);
      map.once("idle", () => {
        state.ready = true;
        say(`${M.villages.toLocaleString("en")} villages in ${M.cities.length} cities`);
      });
      map.triggerRepaint();
    }).catch((err) => {
      state.error = String(err);
      say(window.location.protocol === "file:" ? status.textContent : "could not load the villages: " + err);
    });
    state.rendered = () => map.queryRenderedFeatures({ layers: ["uv-fill"] }).length;
    map.on("click", "uv-fill", (ev) => {
      const f = ev.features && ev.features[0];
      if (!f) return;
      new maplibregl.Popup({ maxWidth: "320px" }).setLngLat(ev.lngLat).setDOMContent(popupNode(f.properties)).addTo(map);
    });
    map.on("mouseenter", "uv-fill", () => { map.getCanvas().style.cursor = "pointer"; });
    map.on("mouseleave", "uv-fill", () => { map.getCanvas().style.cursor = ""; });
    toggle("show-uv", ["uv-"]);
    toggle("show-prob", ["probability-"]);
    toggle("show-imagery", ["imagery-"]);
  });
})();
