// The labelling page of `geolink-engine label` (engine/web/label.py serves it and its API).
// Plain JS, nothing from outside this server. Every answer is POSTed at once, one at a time in order, so the
// server's file always holds the latest; the page keeps no state the server does not have.
"use strict";

const state = {
  ready: false,       // samples and answers loaded
  run: "", version: "", classes: [], keys: {},
  kind: "map",        // "map" (one date) or "change" (two dates side by side)
  vintages: null,     // a change run's [before, after]
  buttons: [],        // [{class, name, short, keys, help}] in key order
  points: [],         // [{id, city, lon, lat, note}] in id order (blind: no map class)
  index: 0,           // the point on screen
  labeller: "",
  answers: {},        // id -> {label, unsure, comment, labelled_at}
  labelled: 0, total: 0,
  pending: 0,         // saves not yet answered
  saved: 0,           // saves answered OK in this page
  error: "",          // the last error shown
  agreement: {},      // other labeller -> agreement document
};
window.labelState = state;  // read by tests/test_label_browser.py

const $ = (id) => document.getElementById(id);
const NAME_RE = /^[a-z0-9][a-z0-9_-]{0,62}$/;
let saveChain = Promise.resolve();

async function api(path, body) {
  const options = body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
  };
  const response = await fetch(path, options);
  let doc = null;
  try { doc = await response.json(); } catch (_) { doc = {error: `HTTP ${response.status}`}; }
  if (!response.ok) throw new Error(doc && doc.error ? doc.error : `HTTP ${response.status}`);
  return doc;
}

function status(text, kind) {
  const el = $("status");
  el.textContent = text;
  el.className = "small " + (kind || "");
  if (kind === "error") state.error = text;
}

// -- loading --------------------------------------------------------------------------------------------------
async function init() {
  try {
    const doc = await api("/api/samples");
    Object.assign(state, {run: doc.run, version: doc.version, classes: doc.classes, keys: doc.keys, points: doc.points,
                          total: doc.points.length, kind: doc.kind || "map", vintages: doc.vintages || null,
                          buttons: doc.buttons || []});
    $("run").textContent = `· run ${doc.run}`;
    setup();
    const fromUrl = new URLSearchParams(location.search).get("labeller");
    const name = fromUrl || localStorage.getItem("geolink-labeller") || doc.default_labeller || "";
    if (NAME_RE.test(name)) await useLabeller(name);
    else askName();
  } catch (err) {
    status(`cannot load the sample: ${err.message}`, "error");
  }
}

function askName() {
  const dialog = $("ask-name");
  if (typeof dialog.showModal === "function") dialog.showModal(); else dialog.setAttribute("open", "");
  $("name-input").focus();
}

async function useLabeller(name) {
  if (!NAME_RE.test(name)) { status(`labeller name '${name}' must be lowercase letters, digits, - and _`, "error"); return; }
  state.ready = false;
  try {
    const doc = await api(`/api/labels?labeller=${encodeURIComponent(name)}`);
    state.labeller = name;
    state.answers = doc.answers;
    state.labelled = doc.labelled;
    localStorage.setItem("geolink-labeller", name);
    const url = new URL(location.href);
    url.searchParams.set("labeller", name);
    history.replaceState(null, "", url);
    $("labeller").value = name;
    const first = doc.first_unlabelled ? state.points.findIndex((p) => p.id === doc.first_unlabelled) : 0;
    state.index = Math.max(first, 0);
    state.ready = true;
    status(doc.first_unlabelled ? `resuming at ${doc.first_unlabelled}` : "every point is labelled", "ok");
    render();
    refreshAgreement();
  } catch (err) {
    status(err.message, "error");
  }
}

// -- the run's classes and views -------------------------------------------------------------------------------
function setup() {
  const change = state.kind === "change";
  document.body.classList.toggle("change", change);
  document.body.dataset.kind = state.kind;
  // the class buttons, in key order
  const buttons = state.buttons.map((b) => {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "cls";
    button.dataset.class = b.class;
    for (const key of b.keys) button.append(cell("kbd", key));
    button.append(` ${b.name}`);
    button.title = b.help;
    button.addEventListener("click", () => { choose(b.class); button.blur(); });
    return button;
  });
  $("classes").replaceChildren(...buttons);
  $("classes").setAttribute("aria-label", change ? "change class" : "class");
  // the help: one line per class, and for a change run what the two dates are
  for (const old of document.querySelectorAll("#help-list li.help-class")) old.remove();
  let after = $("help-dates");
  for (const b of state.buttons) {
    const li = document.createElement("li");
    li.className = "help-class";
    li.append(cell("b", b.name), `: ${b.help}`);
    after.after(li);
    after = li;
  }
  if (change) {
    const [before, later] = state.vintages;
    $("help-dates").hidden = false;
    $("help-dates").textContent = `Two dates: ${before} (first, left) and ${later} (second, right). ` +
      "Compare the same place at both; the map's change class is never shown.";
    document.title = "Label the change sample · geolink-engine";
    $("cap-chip").textContent = `${before} · first date, point in the ring`;
    $("cap-chip-after").textContent = `${later} · second date, same place`;
    $("cap-context").textContent = `${before} · context, 4× wider`;
    $("cap-context-after").textContent = `${later} · context, 4× wider`;
    $("title").firstChild.textContent = "Label the change sample ";
    $("export").replaceChildren("Export for ", cell("code", "change --reference"));
    $("chip").alt = `image chip of the point in ${before}`;
    $("chip-after").alt = `image chip of the point in ${later}`;
  }
  for (const fig of document.querySelectorAll("figure.after")) fig.hidden = !change;
}

// -- drawing --------------------------------------------------------------------------------------------------
function views() {  // the image elements and their URL views
  const out = [["chip", "chip"], ["context", "context"]];
  if (state.kind === "change") out.push(["chip-after", "chip-after"], ["context-after", "context-after"]);
  return out;
}

function imageUrl(kind, point) {
  return `/${kind}/${encodeURIComponent(point.id)}.png?v=${state.version}`;
}

function render() {
  const point = state.points[state.index];
  if (!point) return;
  const answer = state.answers[point.id];
  for (const [el, view] of views()) $(el).src = imageUrl(view, point);
  $("point-id").textContent = `${point.id}  (${state.index + 1} / ${state.total})`;
  $("point-where").textContent = `city ${point.city} · ${point.lat.toFixed(6)}, ${point.lon.toFixed(6)}`;
  $("note").hidden = !point.note;
  $("note").textContent = point.note || "";
  for (const button of document.querySelectorAll(".cls")) {
    button.classList.toggle("chosen", Boolean(answer && answer.label === button.dataset.class));
  }
  $("unsure").checked = Boolean(answer && answer.unsure);
  $("comment").value = answer ? answer.comment : "";
  $("prev").disabled = state.index === 0;
  $("next").disabled = state.index >= state.total - 1;
  renderProgress();
  document.body.dataset.index = String(state.index);
  document.body.dataset.point = point.id;
  for (const ahead of state.points.slice(state.index + 1, state.index + 3)) {  // warm the server's cache
    for (const [, view] of views()) new Image().src = imageUrl(view, ahead);
  }
}

function renderProgress() {
  $("progress").textContent = `${state.labelled} of ${state.total} labelled · ${state.labeller || "no labeller"}`;
  $("bar-fill").style.width = state.total ? `${(100 * state.labelled) / state.total}%` : "0";
  document.body.dataset.labelled = String(state.labelled);
}

function go(index) {
  if (!state.ready) return;
  state.index = Math.min(Math.max(index, 0), state.total - 1);
  if (!state.pending && $("status").className.indexOf("error") < 0) status("");
  render();
}

function firstUnlabelled() {
  const i = state.points.findIndex((p) => !state.answers[p.id]);
  if (i < 0) { status("every point is labelled", "ok"); return; }
  go(i);
}

// -- saving ---------------------------------------------------------------------------------------------------
function save(point, label) {
  const body = {labeller: state.labeller, id: point.id, label, unsure: $("unsure").checked,
                comment: $("comment").value, version: state.version};
  state.answers[point.id] = {label, unsure: body.unsure, comment: body.comment, labelled_at: ""};  // shown at once
  state.pending += 1;
  status(`saving ${point.id}…`);
  saveChain = saveChain.then(async () => {
    try {
      const doc = await api("/api/labels", body);
      state.answers[point.id] = doc.answer;
      state.labelled = doc.labelled;
      state.saved += 1;
      if (state.pending === 1) status(`saved ${point.id}`, "ok");
      if (state.saved % 20 === 0) refreshAgreement();
    } catch (err) {
      status(`not saved (${point.id}): ${err.message}`, "error");
    } finally {
      state.pending -= 1;
      renderProgress();
    }
  });
  return saveChain;
}

function choose(label) {
  if (!state.ready) return;
  const point = state.points[state.index];
  save(point, label);
  if (state.index < state.total - 1) go(state.index + 1); else render();
}

function resaveCurrent() {  // unsure or comment changed on a point already labelled
  const point = state.points[state.index];
  const answer = point && state.answers[point.id];
  if (state.ready && answer) save(point, answer.label);
}

// -- agreement and export -------------------------------------------------------------------------------------
async function refreshAgreement() {
  if (!state.labeller) return;
  try {
    const doc = await api("/api/labellers");
    const others = doc.labellers.filter((l) => l.name !== state.labeller && l.labelled > 0);
    $("agreement").hidden = others.length === 0;
    const parts = [];
    for (const other of others) {
      const a = await api(`/api/agreement?a=${encodeURIComponent(state.labeller)}&b=${encodeURIComponent(other.name)}`);
      state.agreement[other.name] = a;
      parts.push(agreementHtml(a));
    }
    $("agreement-body").replaceChildren(...parts);
  } catch (err) {
    $("agreement-body").textContent = `agreement unavailable: ${err.message}`;
  }
}

function agreementHtml(a) {
  const box = document.createElement("div");
  const head = document.createElement("div");
  const fmt = (x) => (x === null || x === undefined ? "–" : x.toFixed(2));
  head.textContent = a.n === 0
    ? `with ${a.b}: no point labelled by both yet`
    : `with ${a.b}: κ = ${fmt(a.kappa)} [${fmt(a.kappa_lo)}, ${fmt(a.kappa_hi)}] (95%), ` +
      `agree on ${Math.round(100 * a.observed_agreement)}% of ${a.n} points`;
  box.append(head);
  if (a.n > 0) {
    const table = document.createElement("table");
    const short = Object.fromEntries(state.buttons.map((b) => [b.class, b.short]));
    const order = state.buttons.map((b) => a.classes.indexOf(b.class)).filter((i) => i >= 0);
    const header = document.createElement("tr");
    header.append(cell("th", `${a.a} \\ ${a.b}`), ...order.map((j) => cell("th", short[a.classes[j]] || a.classes[j])));
    table.append(header);
    for (const i of order) {  // the buttons' order
      const tr = document.createElement("tr");
      tr.append(cell("th", short[a.classes[i]] || a.classes[i]), ...order.map((j) => cell("td", String(a.table[i][j]))));
      table.append(tr);
    }
    box.append(table);
    if (a.disagreements.length) {
      const list = document.createElement("div");
      list.append("differ on: ");
      for (const id of a.disagreements.slice(0, 30)) {
        const link = document.createElement("a");
        link.href = "#";
        link.textContent = id;
        link.addEventListener("click", (ev) => { ev.preventDefault(); go(state.points.findIndex((p) => p.id === id)); });
        list.append(link, " ");
      }
      if (a.disagreements.length > 30) list.append(`… (${a.disagreements.length})`);
      box.append(list);
    }
  }
  return box;
}

function cell(tag, text) {
  const el = document.createElement(tag);
  el.textContent = text;
  return el;
}

async function exportReference() {
  try {
    await saveChain;
    const doc = await api("/api/export", {labeller: state.labeller});
    $("export-result").textContent = `wrote ${doc.rows} rows to ${doc.path}`;
  } catch (err) {
    $("export-result").textContent = err.message;
  }
}

// -- input ----------------------------------------------------------------------------------------------------
function keyClass(key) {
  for (const [cls, keys] of Object.entries(state.keys)) if (keys.includes(key)) return cls;
  return null;
}

function onKey(ev) {
  if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
  const typing = ev.target instanceof HTMLInputElement && ev.target.type === "text";
  if (typing) {
    if (ev.target.id === "comment" && (ev.key === "Enter" || ev.key === "Escape")) {
      ev.preventDefault();
      ev.target.blur();  // `change` saves it
    }
    return;
  }
  const cls = keyClass(ev.key.toLowerCase());
  if (cls) { ev.preventDefault(); choose(cls); return; }
  switch (ev.key) {
    case "ArrowRight": ev.preventDefault(); go(state.index + 1); break;
    case "ArrowLeft": ev.preventDefault(); go(state.index - 1); break;
    case "s": case "S": ev.preventDefault(); $("unsure").checked = !$("unsure").checked; resaveCurrent(); break;
    case "c": case "C": ev.preventDefault(); $("comment").focus(); break;
    case "f": case "F": ev.preventDefault(); firstUnlabelled(); break;
    default: break;
  }
}

function wire() {
  document.addEventListener("keydown", onKey);
  $("prev").addEventListener("click", () => go(state.index - 1));
  $("next").addEventListener("click", () => go(state.index + 1));
  $("todo").addEventListener("click", firstUnlabelled);
  $("unsure").addEventListener("change", () => { $("unsure").blur(); resaveCurrent(); });
  $("comment").addEventListener("change", resaveCurrent);
  $("switch").addEventListener("click", () => useLabeller($("labeller").value.trim()));
  $("labeller").addEventListener("keydown", (ev) => { if (ev.key === "Enter") useLabeller($("labeller").value.trim()); });
  $("name-form").addEventListener("submit", () => useLabeller($("name-input").value.trim()));
  $("agreement-refresh").addEventListener("click", refreshAgreement);
  $("export").addEventListener("click", exportReference);
  window.addEventListener("beforeunload", (ev) => { if (state.pending > 0) { ev.preventDefault(); ev.returnValue = ""; } });
}

wire();
init();
setInterval(refreshAgreement, 30000);  // a second labeller who starts later appears without a reload
