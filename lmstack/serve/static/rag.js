// Ask your documents: streams POST /v1/rag/answer (SSE). The retrieved chunks show as cards at once; the answer
// streams in with its [n] citations turned into links that scroll to and highlight source card n.
"use strict";
let controller = null;
let sources = [];   // the numbered sources of the last answer (n = index + 1)

function scoreBar(score, max) {
  const w = max > 0 ? Math.max(4, Math.round(100 * score / max)) : 0;
  return el("span", { class: "bar" }, el("span", { style: `width:${w}%` }));
}

function card(h, max, cited, final) {
  const n = h.n;
  const cls = "card" + (n && cited.has(n) ? " cited" : "") + (final && !n ? " unused" : "");
  const tag = !final ? null : (!n ? "not in context" : (cited.has(n) ? "cited" : "in context"));
  return el("div", { class: cls, id: n ? `src-${n}` : null, "data-path": h.path, "data-chunk": h.chunk_id },
    el("div", { class: "head" },
      n ? el("span", { class: "n", text: `[${n}]` }) : null,
      el("span", { class: "path", text: h.path }),
      h.headings && h.headings.length ? el("span", { class: "headings", text: h.headings.join(" › ") }) : null,
      tag ? el("span", { class: "tag", text: tag }) : null,
      el("span", { class: "score", title: "retrieval score" }, scoreBar(h.score, max), fmt(h.score, 4))),
    el("div", { class: "text", text: h.text }));
}

function showCards(hits, cited = new Set(), final = false) {
  const box = $("sources");
  box.textContent = "";
  const max = Math.max(0, ...hits.map((h) => h.score));
  for (const h of hits) box.append(card(h, max, cited, final));
}

function highlight(n) {
  const c = $(`src-${n}`);
  if (!c) return;
  for (const old of document.querySelectorAll(".card.highlight")) old.classList.remove("highlight");
  c.classList.add("highlight");
  c.scrollIntoView({ behavior: "smooth", block: "center" });
}

// The answer text with every [n] that names a source turned into a citation link.
function renderAnswer(text) {
  const box = $("answer");
  box.textContent = "";
  let last = 0;
  for (const m of text.matchAll(/\[(\d+)\]/g)) {
    const n = +m[1];
    if (n < 1 || n > sources.length) continue;
    box.append(text.slice(last, m.index));
    box.append(el("a", { class: "cite", href: `#src-${n}`, "data-n": n, text: `[${n}]`,
                         title: sources[n - 1].path,
                         onclick: (e) => { e.preventDefault(); highlight(n); } }));
    last = m.index + m[0].length;
  }
  box.append(text.slice(last));
}

function request() {
  return {
    question: $("question").value, vector_store_id: $("store").value || undefined, stream: true,
    mode: $("mode").value, synthesis: $("synthesis").value, top_k: Number($("top_k").value),
    max_tokens: Number($("max_tokens").value), temperature: Number($("temperature").value),
  };
}

async function ask() {
  if (!$("question").value.trim()) { setStatus("type a question first", true); return; }
  sources = [];
  let text = "";
  $("answer").textContent = "";
  $("answer").classList.add("streaming");
  $("sources").textContent = "";
  $("sources-note").textContent = "";
  $("ask").disabled = true;
  $("stop").disabled = false;
  setStatus("retrieving…");
  controller = new AbortController();
  const t0 = performance.now();
  try {
    await apiStream("/v1/rag/answer", request(), (ev) => {
      if (ev.object === "rag.retrieval") {
        showCards(ev.retrieved);
        $("sources-note").textContent = `(${ev.retrieved.length} chunks retrieved, ${ev.mode})`;
        setStatus("answering…");
      } else if (ev.object === "rag.answer.delta") {
        text += ev.delta;
        renderAnswer(text);
      } else if (ev.object === "rag.answer") {
        sources = ev.sources;
        renderAnswer(ev.answer);
        const cited = new Set(ev.citations);
        const unused = ev.retrieved.filter((h) => h.n === null);
        showCards(ev.sources.concat(unused), cited, true);
        $("sources-note").textContent = `(${ev.sources.length} in the model's context, ` +
          `${ev.citations.length} cited; ${unused.length} more retrieved)`;
      }
    }, controller.signal);
    setStatus(`done in ${((performance.now() - t0) / 1000).toFixed(2)} s`);
  } catch (e) {
    setStatus(e.name === "AbortError" ? "stopped" : String(e.message || e), e.name !== "AbortError");
  } finally {
    $("answer").classList.remove("streaming");
    $("ask").disabled = false;
    $("stop").disabled = true;
    controller = null;
  }
}

$("ask").addEventListener("click", ask);
$("stop").addEventListener("click", () => controller && controller.abort());
$("question").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) ask();
});
loadConfig().catch((e) => setStatus("could not load the page config: " + e, true));
