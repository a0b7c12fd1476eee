// lmstack playground: streams /v1/completions or /v1/chat/completions (SSE over fetch) and colours each token
// by its probability, with the top alternatives in the token's tooltip.
"use strict";
const $ = (id) => document.getElementById(id);
const SLIDERS = ["temperature", "top_k", "top_p", "min_p", "frequency_penalty", "presence_penalty", "max_tokens"];
const TOP_N = 5;
let chat = [];          // chat-mode history: [{role, content}]
let controller = null;  // AbortController of the running request

for (const id of SLIDERS) {
  const input = $(id), out = document.querySelector(`output[for=${id}]`);
  const show = () => { out.textContent = input.value; };
  input.addEventListener("input", show);
  show();
}

for (const r of document.querySelectorAll("input[name=mode]")) {
  r.addEventListener("change", () => {
    const chatMode = mode() === "chat";
    $("prompt-mode").hidden = chatMode;
    $("chat-mode").hidden = !chatMode;
  });
}
const mode = () => document.querySelector("input[name=mode]:checked").value;

fetch("/playground/config").then((r) => r.json()).then((cfg) => {
  $("model").textContent = cfg.model;
  $("key-row").hidden = !cfg.api_key_required;
  const mt = $("max_tokens");
  mt.max = Math.max(1, cfg.context_length - 1);
  if (+mt.value > +mt.max) mt.value = Math.min(16, mt.max);
  mt.dispatchEvent(new Event("input"));
}).catch(() => {});

function status(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function colour(p) {  // red (unlikely) -> yellow -> green (likely)
  return `hsla(${Math.round(120 * p)}, 80%, 50%, 0.35)`;
}

const show = (t) => JSON.stringify(t).slice(1, -1);  // makes spaces and newlines in tokens visible

function addToken(token, logprob, top) {
  const span = document.createElement("span");
  span.className = "tok";
  span.textContent = token;
  const p = logprob == null ? null : Math.exp(logprob);
  if (p != null) span.style.background = colour(p);
  let title = `"${show(token)}"  p=${p == null ? "?" : p.toFixed(4)}`;
  if (top && top.length) {
    title += "\n" + top.map(([t, lp]) => `  "${show(t)}"  ${Math.exp(lp).toFixed(4)}`).join("\n");
  }
  span.title = title;
  span.dataset.p = p == null ? "" : p.toFixed(6);
  $("tokens").appendChild(span);
}

function body() {
  const b = { stream: true };
  for (const id of SLIDERS) b[id] = Number($(id).value);
  const seed = $("seed").value.trim();
  if (seed !== "") b.seed = parseInt(seed, 10);
  if (mode() === "chat") {
    const msg = $("user-msg").value;
    if (msg.trim()) chat.push({ role: "user", content: msg });
    b.messages = chat.slice();
    b.logprobs = true;
    b.top_logprobs = TOP_N;
  } else {
    b.prompt = $("prompt").value;
    b.logprobs = TOP_N;
  }
  return b;
}

// One parsed chunk -> [text, [[token, logprob, [[alt, logprob], ...]], ...]]
function parseChunk(chunk, isChat) {
  const c = (chunk.choices || [])[0];
  if (!c) return ["", []];
  const toks = [];
  if (isChat) {
    for (const e of (c.logprobs && c.logprobs.content) || []) {
      toks.push([e.token, e.logprob, (e.top_logprobs || []).map((a) => [a.token, a.logprob])]);
    }
    return [(c.delta && c.delta.content) || "", toks];
  }
  const lp = c.logprobs;
  if (lp) {
    lp.tokens.forEach((t, i) => {
      const top = lp.top_logprobs && lp.top_logprobs[i] ? Object.entries(lp.top_logprobs[i]) : [];
      top.sort((a, b) => b[1] - a[1]);
      toks.push([t, lp.token_logprobs[i], top]);
    });
  }
  return [c.text || "", toks];
}

function renderChat(pending) {
  const log = $("chat-log");
  log.textContent = "";
  for (const m of chat.concat(pending ? [pending] : [])) {
    const d = document.createElement("div");
    d.className = "msg " + m.role;
    d.textContent = m.content;
    log.appendChild(d);
  }
}

async function generate() {
  const isChat = mode() === "chat";
  const req = body();
  const headers = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) headers.Authorization = "Bearer " + key;
  $("output").textContent = "";
  $("tokens").textContent = "";
  $("generate").disabled = true;
  $("stop").disabled = false;
  status("generating…");
  controller = new AbortController();
  const reply = { role: "assistant", content: "" };
  if (isChat) { $("user-msg").value = ""; renderChat(reply); }
  let nTokens = 0, finish = null;
  const t0 = performance.now();
  try {
    const res = await fetch(isChat ? "/v1/chat/completions" : "/v1/completions", {
      method: "POST", headers, body: JSON.stringify(req), signal: controller.signal,
    });
    if (!res.ok) {
      let msg = `HTTP ${res.status}`;
      try { msg += ": " + (await res.json()).error.message; } catch (e) { /* not JSON */ }
      throw new Error(msg);
    }
    await readSSE(res, (chunk) => {
      const [text, toks] = parseChunk(chunk, isChat);
      const c = (chunk.choices || [])[0];
      if (c && c.finish_reason) finish = c.finish_reason;
      $("output").textContent += text;
      reply.content += text;
      for (const [t, lp, top] of toks) { addToken(t, lp, top); nTokens++; }
      if (isChat) renderChat(reply);
    });
    const secs = (performance.now() - t0) / 1000;
    status(`done: ${nTokens} tokens in ${secs.toFixed(2)} s` + (finish ? ` (${finish})` : ""));
  } catch (e) {
    status(e.name === "AbortError" ? "stopped" : String(e.message || e), e.name !== "AbortError");
  } finally {
    if (isChat) { if (reply.content) chat.push(reply); renderChat(null); }
    $("generate").disabled = false;
    $("stop").disabled = true;
    controller = null;
  }
}

$("generate").addEventListener("click", generate);
$("stop").addEventListener("click", () => controller && controller.abort());
