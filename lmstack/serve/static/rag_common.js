// Shared by the /rag and /embeddings pages: the page config (model, stores, whether a key is needed), JSON and
// SSE requests with the API key, and a small element builder. Plain JS, no dependencies.
"use strict";
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined) e.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = "status" + (isError ? " error" : "");
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) {
    h.Authorization = "Bearer " + key;
    try { sessionStorage.setItem("lmstack-api-key", key); } catch (e) { /* storage off */ }
  }
  return h;
}

async function errorOf(res) {
  let msg = `HTTP ${res.status}`;
  try { msg += ": " + (await res.json()).error.message; } catch (e) { /* not JSON */ }
  return new Error(msg);
}

async function api(path, body, signal) {
  const res = await fetch(path, body === undefined ? { headers: headers(), signal }
    : { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
  if (!res.ok) throw await errorOf(res);
  return res.json();
}

// POST `body` and call onEvent(obj) for every SSE data event until [DONE].
async function apiStream(path, body, onEvent, signal) {
  const res = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
  if (!res.ok) throw await errorOf(res);
  await readSSE(res, onEvent);
}

// The page config: shows the model and the key box, fills the store selector; resolves to the config.
async function loadConfig() {
  const cfg = await (await fetch("/rag/config")).json();
  $("model").textContent = cfg.model;
  $("key-row").hidden = !cfg.api_key_required;
  try { $("api-key").value = sessionStorage.getItem("lmstack-api-key") || ""; } catch (e) { /* storage off */ }
  const sel = $("store");
  sel.textContent = "";
  for (const s of cfg.stores) {
    sel.append(el("option", { value: s.id, text: `${s.name} (${s.documents} docs, ${s.chunks} chunks)`, title: s.embed_model }));
  }
  if (!cfg.stores.length) {
    sel.append(el("option", { value: "", text: "no index: start with --index DIR" }));
    setStatus("this server has no document index; start it with `lmstack serve --model M --index DIR`", true);
  }
  return cfg;
}

const sourceColour = (i) => `hsl(${Math.round((i * 137.508) % 360)}, 62%, 48%)`;
const fmt = (x, d = 3) => (x === null || x === undefined ? "" : Number(x).toFixed(d));
