// Embeddings playground: the cosine-similarity matrix of typed texts (POST /v1/rag/similarity), the nearest chunks
// of a query (POST /v1/rag/neighbours) and a 2-D PCA map of the index's chunks (GET /v1/rag/map) drawn in SVG,
// coloured by source document, with the query and its neighbours marked on it.
"use strict";
const SVG = "http://www.w3.org/2000/svg";
const W = 800, H = 520, PAD = 24;
let cfg = null;
let map = null;        // the last /v1/rag/map answer
let toXY = null;       // map coordinates -> SVG pixels
const hidden = new Set();  // sources switched off in the legend

function svg(tag, attrs = {}) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

// similarity -> colour: blue-ish below 0, white at 0, warm up to red at 1
function simColour(s) {
  if (s < 0) return `hsl(220, 70%, ${Math.round(100 - 8 * Math.min(1, -s * 3))}%)`;
  return `hsl(10, 80%, ${Math.round(100 - 45 * Math.min(1, s))}%)`;
}

// ------------------------------------------------------------------------------------------------- similarity
async function compare() {
  const texts = $("texts").value.split("\n").map((t) => t.trim()).filter((t) => t);
  if (!texts.length) { setStatus("type at least one line", true); return; }
  setStatus("embedding…");
  try {
    const r = await api("/v1/rag/similarity", { texts, vector_store_id: $("store").value || undefined });
    drawGrid(r.texts, r.matrix);
    drawRanking(r.texts, r.matrix);
    setStatus(`${texts.length} texts embedded with ${r.model}`);
  } catch (e) {
    setStatus(String(e.message || e), true);
  }
}

function drawGrid(texts, m) {
  const g = $("grid");
  g.textContent = "";
  const n = texts.length;
  g.style.gridTemplateColumns = `minmax(8em, 16em) repeat(${n}, minmax(38px, 1fr))`;
  g.append(el("div"));
  texts.forEach((t, j) => g.append(el("div", { class: "lab col", title: t, text: `${j + 1}. ${t}` })));
  for (let i = 0; i < n; i++) {
    g.append(el("div", { class: "lab", title: texts[i], text: `${i + 1}. ${texts[i]}` }));
    for (let j = 0; j < n; j++) {
      const s = m[i][j];
      g.append(el("div", { class: "cell" + (i === j ? " diag" : ""), "data-i": i, "data-j": j, "data-sim": s,
                           style: `background:${simColour(s)}`, title: `${texts[i]}\n${texts[j]}\ncosine ${fmt(s)}`,
                           text: fmt(s, 2) }));
    }
  }
}

function drawRanking(texts, m) {
  const box = $("ranking");
  box.textContent = "";
  if (texts.length < 2) return;
  const order = texts.map((t, j) => j).slice(1).sort((a, b) => m[0][b] - m[0][a]);
  for (const j of order) {
    const s = m[0][j];
    box.append(el("div", { class: "r" }, el("span", { text: fmt(s, 3) }),
      el("div", { class: "w" }, el("span", { style: `width:${Math.max(0, Math.round(100 * s))}%` }),
        el("em", { text: texts[j] }))));
  }
}

// -------------------------------------------------------------------------------------------------------- map
async function loadMap() {
  const sid = $("store").value;
  if (!sid) return;
  try {
    map = await api("/v1/rag/map?vector_store_id=" + encodeURIComponent(sid));
  } catch (e) {
    setStatus(String(e.message || e), true);
    return;
  }
  hidden.clear();
  drawMap();
  drawLegend();
  const [a, b] = map.explained_variance_ratio.map((r) => (100 * r).toFixed(1));
  $("map-note").textContent = `${map.points.length} of ${map.n_chunks} chunks; the two axes explain ${a}% and ` +
    `${b}% of the variance of the ${map.model} vectors.`;
}

function drawMap() {
  const s = $("map");
  s.textContent = "";
  const pts = map.points;
  const xs = pts.map((p) => p.x), ys = pts.map((p) => p.y);
  const [x0, x1] = [Math.min(...xs, 0), Math.max(...xs, 0)], [y0, y1] = [Math.min(...ys, 0), Math.max(...ys, 0)];
  const sc = Math.min((W - 2 * PAD) / ((x1 - x0) || 1), (H - 2 * PAD) / ((y1 - y0) || 1));
  const cx = (W - sc * (x1 - x0)) / 2, cy = (H - sc * (y1 - y0)) / 2;
  toXY = (x, y) => [cx + sc * (x - x0), H - (cy + sc * (y - y0))];
  s.append(svg("line", { x1: toXY(x0, 0)[0], y1: toXY(0, 0)[1], x2: toXY(x1, 0)[0], y2: toXY(0, 0)[1], stroke: "#eee" }));
  s.append(svg("line", { x1: toXY(0, 0)[0], y1: toXY(0, y0)[1], x2: toXY(0, 0)[0], y2: toXY(0, y1)[1], stroke: "#eee" }));
  const r = pts.length > 2000 ? 2.2 : pts.length > 400 ? 3.5 : 6;
  const layer = svg("g", { id: "points" });
  pts.forEach((p, i) => {
    const [x, y] = toXY(p.x, p.y);
    layer.append(svg("circle", { class: "pt", cx: x.toFixed(1), cy: y.toFixed(1), r, fill: sourceColour(p.source),
                                 "data-i": i, "data-chunk": p.chunk_id, "data-source": p.source }));
  });
  s.append(layer);
  s.append(svg("g", { id: "overlay" }));
}

function drawLegend() {
  const box = $("legend");
  box.textContent = "";
  map.sources.forEach((src, i) => {
    const item = el("span", { class: "item", "data-source": i, title: src.path },
      el("span", { class: "sw", style: `background:${sourceColour(i)}` }), src.path.split("/").pop());
    item.addEventListener("click", () => {
      hidden.has(i) ? hidden.delete(i) : hidden.add(i);
      item.classList.toggle("off", hidden.has(i));
      for (const c of document.querySelectorAll(`#map circle.pt[data-source="${i}"]`)) {
        c.style.display = hidden.has(i) ? "none" : "";
      }
    });
    box.append(item);
  });
}

function showTip(evt) {
  const c = evt.target.closest("circle.pt");
  const tip = $("tip");
  if (!c || !map) { tip.hidden = true; return; }
  const p = map.points[+c.dataset.i], src = map.sources[p.source];
  tip.textContent = "";
  tip.append(el("b", { text: src.path }), `\n${p.preview}${p.preview.length >= 160 ? "…" : ""}`);
  const box = $("map-wrap").getBoundingClientRect();
  tip.style.left = Math.min(evt.clientX - box.left + 12, box.width - 300) + "px";
  tip.style.top = evt.clientY - box.top + 12 + "px";
  tip.hidden = false;
}

// ------------------------------------------------------------------------------------------------- neighbours
async function find() {
  const query = $("query").value.trim();
  if (!query) { setStatus("type a query", true); return; }
  setStatus("searching…");
  try {
    const r = await api("/v1/rag/neighbours", { query, k: Number($("k").value),
                                                vector_store_id: $("store").value || undefined });
    showNeighbours(r);
    setStatus(`${r.data.length} nearest chunks of “${query}”`);
  } catch (e) {
    setStatus(String(e.message || e), true);
  }
}

function showNeighbours(r) {
  const box = $("neighbours");
  box.textContent = "";
  const near = new Set(r.data.map((h) => h.chunk_id));
  for (const h of r.data) {
    const src = map ? map.sources.findIndex((s) => s.path === h.path) : -1;
    box.append(el("div", { class: "card", "data-chunk": h.chunk_id, style: src >= 0 ? `border-left-color:${sourceColour(src)}` : null,
                           onclick: () => pulse(h.chunk_id) },
      el("div", { class: "head" }, el("span", { class: "n", text: `#${h.rank}` }),
        el("span", { class: "path", text: h.path }),
        el("span", { class: "score" }, el("span", { class: "bar" }, el("span", { style: `width:${Math.max(0, Math.round(100 * h.score))}%` })),
          fmt(h.score, 3))),
      el("div", { class: "text", text: h.text })));
  }
  if (!map || !toXY) return;
  for (const c of document.querySelectorAll("#map circle.pt")) {
    c.classList.toggle("near", near.has(+c.dataset.chunk));
    c.classList.toggle("dim", !near.has(+c.dataset.chunk));
  }
  const ov = $("overlay");
  ov.textContent = "";
  const [qx, qy] = toXY(r.query_point.x, r.query_point.y);
  for (const c of document.querySelectorAll("#map circle.pt.near")) {
    ov.append(svg("line", { class: "qline", x1: qx, y1: qy, x2: c.getAttribute("cx"), y2: c.getAttribute("cy") }));
  }
  const star = svg("path", { class: "query", d: starPath(qx, qy, 9, 4) });
  star.append(svg("title"));
  star.firstChild.textContent = "your query: " + r.query;
  ov.append(star);
}

function starPath(x, y, R, r) {
  let d = "";
  for (let i = 0; i < 10; i++) {
    const a = -Math.PI / 2 + i * Math.PI / 5, rad = i % 2 ? r : R;
    d += (i ? "L" : "M") + (x + rad * Math.cos(a)).toFixed(1) + "," + (y + rad * Math.sin(a)).toFixed(1);
  }
  return d + "Z";
}

function pulse(chunkId) {
  const c = document.querySelector(`#map circle.pt[data-chunk="${chunkId}"]`);
  if (!c) return;
  const r0 = c.getAttribute("r");
  c.setAttribute("r", r0 * 2.2);
  setTimeout(() => c.setAttribute("r", r0), 700);
}

// ------------------------------------------------------------------------------------------------------- wiring
function storeChanged() {
  const s = cfg && cfg.stores.find((x) => x.id === $("store").value);
  $("embed-model").textContent = s ? s.embed_model : "none";
  $("neighbours").textContent = "";
  loadMap();
}

$("compare").addEventListener("click", compare);
$("find").addEventListener("click", find);
$("query").addEventListener("keydown", (e) => { if (e.key === "Enter") find(); });
$("store").addEventListener("change", () => { storeChanged(); compare(); });
$("map").addEventListener("mousemove", showTip);
$("map").addEventListener("mouseleave", () => { $("tip").hidden = true; });
$("api-key").addEventListener("change", () => { storeChanged(); compare(); });
loadConfig().then((c) => {
  cfg = c;
  if (!c.stores.length) return;
  if (c.api_key_required && !$("api-key").value) { setStatus("enter the API key"); return; }
  storeChanged();
  compare();
}).catch((e) => setStatus("could not load the page config: " + e, true));
