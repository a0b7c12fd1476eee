// lmstack feedback page: show a prompt with two sampled completions, record the person's vote (served by
// lmstack/serve/feedback.py). No dependencies, works offline.
"use strict";
const $ = (id) => document.getElementById(id);
const sides = ["a", "b"];
let current = null;        // the pair on screen: {id, prompt, messages?, completion_a, completion_b, ...}
let defaultAnnotator = "";  // the server's --annotator (or the user name it runs under)
let busy = false;
let tagNames = [];         // the server's --tags
const ratings = {};        // side -> 1..7 (unset: no rating)
const tagsOn = { a: new Set(), b: new Set() };
let pollTimer = null;      // refreshes the learner line while a refit runs

function setStatus(text, cls) {
  const s = $("status");
  s.textContent = text;
  s.className = cls || "";
}

function setBusy(on) {
  busy = on;
  document.querySelectorAll(".actions button").forEach((b) => { b.disabled = on || !current; });
}

function showProgress(p) {
  if (!p) return;
  let t = `${p.done} / ${p.total} judged`;
  if (p.skipped) t += `, ${p.skipped} skipped`;
  $("progress").textContent = t;
  showLearner(p);
}

// the active-learning counter: votes, votes since the last refit, held-out agreement of the current reward model
function showLearner(p) {
  const el = $("learner");
  const a = p.active;
  if (!a) {
    el.textContent = p.strategy === "random" ? "random order" : "file order";
    return;
  }
  const agree = a.agreement === null || a.agreement === undefined ? "—"
    : `${Math.round(a.agreement * 100)}% of ${a.heldout}`;
  let t = `active learning: ${a.votes} vote${a.votes === 1 ? "" : "s"}, ${a.since_refit} since refit · ` +
    `held-out agreement ${agree}`;
  if (a.fitting) t += " · refitting…";
  if (a.refit_error) t += ` · refit failed: ${a.refit_error}`;
  el.textContent = t;
  el.className = a.refit_error ? "error" : "";
  el.dataset.votes = a.votes;
  clearTimeout(pollTimer);
  if (a.fitting) pollTimer = setTimeout(refreshProgress, 2000);
}

async function refreshProgress() {
  const { ok, data } = await api("/api/progress");
  if (ok) showProgress(data);
}

function buildFeedbackControls() {
  for (const s of sides) {
    const r = $("rating-" + s);
    for (let v = 1; v <= 7; v++) {
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = String(v);
      b.dataset.value = String(v);
      b.title = `rate ${s.toUpperCase()} ${v} of 7 (click again to clear)`;
      b.setAttribute("aria-pressed", "false");
      b.addEventListener("click", () => { ratings[s] = ratings[s] === v ? undefined : v; showFeedbackControls(); });
      r.append(b);
    }
    const t = $("tags-" + s);
    for (const name of tagNames) {
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = name;
      b.dataset.tag = name;
      b.setAttribute("aria-pressed", "false");
      b.addEventListener("click", () => {
        if (tagsOn[s].has(name)) tagsOn[s].delete(name); else tagsOn[s].add(name);
        showFeedbackControls();
      });
      t.append(b);
    }
  }
}

function showFeedbackControls() {
  for (const s of sides) {
    $("rating-" + s).querySelectorAll("button").forEach((b) => {
      b.setAttribute("aria-pressed", String(ratings[s] === Number(b.dataset.value)));
    });
    $("tags-" + s).querySelectorAll("button").forEach((b) => {
      b.setAttribute("aria-pressed", String(tagsOn[s].has(b.dataset.tag)));
    });
  }
}

function resetFeedbackControls() {
  for (const s of sides) { ratings[s] = undefined; tagsOn[s].clear(); }
  $("critique").value = "";
  showFeedbackControls();
}

// the optional richer feedback of a vote: ratings, tags, critique (only what was given)
function richFeedback(body) {
  const r = {}, t = {};
  for (const s of sides) {
    if (ratings[s]) r[s] = ratings[s];
    if (tagsOn[s].size) t[s] = tagNames.filter((n) => tagsOn[s].has(n));
  }
  if (Object.keys(r).length) body.ratings = r;
  if (Object.keys(t).length) body.tags = t;
  const c = $("critique").value.trim();
  if (c) body.critique = c;
}

async function api(path, body) {
  const opts = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const r = await fetch(path, opts);
  let data = null;
  try { data = await r.json(); } catch (e) { data = { error: { message: `HTTP ${r.status}` } }; }
  return { ok: r.ok, status: r.status, data };
}

function renderPrompt(pair) {
  const box = $("prompt");
  box.textContent = "";
  if (pair.messages) {
    for (const m of pair.messages) {
      const d = document.createElement("div");
      d.className = "turn " + m.role;
      const r = document.createElement("span");
      r.className = "role";
      r.textContent = m.role;
      d.append(r, document.createTextNode(m.content));
      box.append(d);
    }
  } else {
    box.textContent = pair.prompt;
  }
  $("prompt-id").textContent = `#${pair.id}`;
  $("info").textContent = pair.information ? `information ${pair.information.toPrecision(2)} ` +
    `(best of ${pair.candidates} candidates)` : "";
}

function markEdited(side) {
  const ta = $("completion-" + side);
  const edited = current && ta.value !== current["completion_" + side];
  const cand = $("cand-" + side);
  cand.classList.toggle("is-edited", !!edited);
  cand.querySelector(".edited-badge").hidden = !edited;
  cand.querySelector(".reset").hidden = !edited;
}

async function loadNext() {
  current = null;
  setBusy(true);
  document.body.dataset.state = "loading";
  setStatus("sampling two completions…");
  for (const s of sides) {
    $("completion-" + s).value = "";
    $("cand-" + s).classList.remove("picked");
    markEdited(s);
  }
  resetFeedbackControls();
  const { ok, data } = await api("/api/next");
  if (!ok) {
    setStatus(data.error ? data.error.message : "could not load the next prompt", "error");
    document.body.dataset.state = "error";
    setBusy(false);
    return;
  }
  showProgress(data.progress);
  if (data.done) {
    $("prompt").textContent = "";
    $("prompt-id").textContent = "";
    $("info").textContent = "";
    $("pair").hidden = true;
    $("critique-box").hidden = true;
    $("done").hidden = false;
    $("unskip").hidden = !(data.progress && data.progress.skipped);
    setStatus("");
    document.body.dataset.state = "done";
    setBusy(false);
    return;
  }
  $("pair").hidden = false;
  $("critique-box").hidden = false;
  $("done").hidden = true;
  current = data;
  renderPrompt(data);
  for (const s of sides) {
    $("completion-" + s).value = data["completion_" + s];
    $("completion-" + s).placeholder = "(empty completion)";
    markEdited(s);
  }
  document.body.dataset.promptId = data.id;
  document.body.dataset.state = "ready";
  setStatus("");
  setBusy(false);
}

function annotatorName() {
  return $("annotator").value.trim() || defaultAnnotator;
}

async function vote(choice) {
  if (!current || busy) return;
  const name = annotatorName();
  if (!name) {
    setStatus("Enter your name in the Annotator box first.", "error");
    $("annotator").focus();
    return;
  }
  const body = { id: current.id, choice, annotator: name };
  const dropped = sides.filter((s) => s !== choice && $("completion-" + s).value !== current["completion_" + s]);
  if (choice === "a" || choice === "b") {
    const text = $("completion-" + choice).value;
    if (text !== current["completion_" + choice]) body.edited_text = text;
    $("cand-" + choice).classList.add("picked");
  }
  richFeedback(body);
  setBusy(true);
  setStatus("saving…");
  const { ok, status, data } = await api("/api/vote", body);
  if (ok) {
    const label = { a: "A better", b: "B better", tie: "tie", both_bad: "both bad" }[choice];
    showProgress(data.progress);
    await loadNext();
    let msg = `saved: ${label}${data.saved.edited ? " (edited)" : ""}`;
    const extra = [data.saved.ratings && "rating", data.saved.tags && "tags", data.saved.critique && "critique"];
    if (extra.some(Boolean)) msg += ` with ${extra.filter(Boolean).join(", ")}`;
    if (dropped.length) msg += ` (your edit of ${dropped.join(" and ").toUpperCase()} was not kept: edits count only for the side you pick)`;
    setStatus(msg, "ok");
  } else if (status === 409) {  // voted elsewhere (another tab) or the server restarted: move on
    setStatus(data.error.message, "error");
    await loadNext();
  } else {
    setStatus(data.error ? data.error.message : `HTTP ${status}`, "error");
    $("cand-a").classList.remove("picked");
    $("cand-b").classList.remove("picked");
    setBusy(false);
  }
}

async function skip() {
  if (!current || busy) return;
  setBusy(true);
  await api("/api/skip", { id: current.id });
  await loadNext();
  setStatus("skipped (it comes back after a restart or from the end screen)");
}

document.querySelectorAll(".actions button[data-choice]").forEach((b) => {
  b.addEventListener("click", () => vote(b.dataset.choice));
});
$("skip").addEventListener("click", skip);
$("unskip").addEventListener("click", async () => { await api("/api/unskip", {}); await loadNext(); });
document.querySelectorAll("button.reset").forEach((b) => {
  b.addEventListener("click", () => {
    const s = b.dataset.side;
    if (current) $("completion-" + s).value = current["completion_" + s];
    markEdited(s);
  });
});
for (const s of sides) {
  const ta = $("completion-" + s);
  ta.addEventListener("input", () => markEdited(s));
  ta.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); vote(s); }
    if (e.key === "Escape") ta.blur();
  });
}
$("critique").addEventListener("keydown", (e) => { if (e.key === "Escape") e.target.blur(); });
$("annotator").addEventListener("change", () => {
  try { localStorage.setItem("lmstack-annotator", $("annotator").value.trim()); } catch (e) { /* private mode */ }
});
$("annotator").addEventListener("input", () => { if ($("status").className === "error") setStatus(""); });
$("annotator").addEventListener("keydown", (e) => { if (e.key === "Escape" || e.key === "Enter") e.target.blur(); });

document.addEventListener("keydown", (e) => {
  const t = e.target;
  if (t && (t.tagName === "TEXTAREA" || t.tagName === "INPUT") || e.ctrlKey || e.metaKey || e.altKey) return;
  const k = e.key.toLowerCase();
  const map = { "1": "a", a: "a", "2": "b", b: "b", "3": "tie", t: "tie", "4": "both_bad", x: "both_bad" };
  if (map[k]) { e.preventDefault(); vote(map[k]); }
  else if (k === "s") { e.preventDefault(); skip(); }
  else if (k === "e") { e.preventDefault(); $("completion-" + (e.shiftKey ? "b" : "a")).focus(); }
  else if (k === "c") { e.preventDefault(); $("critique").focus(); }
});

(async function init() {
  const { ok, data } = await api("/api/config");
  if (ok) {
    tagNames = data.tags || [];
    $("critique").maxLength = data.max_critique || 4000;
    $("model").textContent = data.model;
    defaultAnnotator = data.annotator || "";
    $("annotator").placeholder = defaultAnnotator || "your name";
    $("export-cmd").textContent = `lmstack feedback --out ${data.out} --export pairs.jsonl`;
    showProgress(data.progress);
  }
  let saved = "";
  try { saved = localStorage.getItem("lmstack-annotator") || ""; } catch (e) { /* private mode */ }
  $("annotator").value = saved || defaultAnnotator;
  buildFeedbackControls();
  await loadNext();
})();
