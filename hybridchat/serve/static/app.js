// The page: one question at a time over POST /v1/chat/completions (streamed), sources beside the
// answer with the cited one highlighted, the confidence and abstention said plainly. Text from the
// server only ever goes in through textContent: a document's text is shown, never run.
"use strict";
const $ = (id) => document.getElementById(id);
let model = null;

function headers() {
  const h = {"Content-Type": "application/json"};
  const key = $("apikey").value || localStorage.getItem("hybridchat-key");
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

async function errorText(response) {
  try { return (await response.json()).error.message; } catch (_) { return response.status + " " + response.statusText; }
}

function needKey(response) {
  if (response.status !== 401) return false;
  $("key-label").hidden = false;
  $("apikey").focus();
  return true;
}

async function connect() {
  const response = await fetch("/v1/models", {headers: headers()});
  if (!response.ok) { needKey(response); $("model").textContent = await errorText(response); return; }
  model = (await response.json()).data[0];
  const about = model.hybridchat;
  $("model").textContent = model.id + (about.retrieval ? ` · top-${about.top_k}` : " · closed-book") +
    (about.max_hops > 1 ? ` · up to ${about.max_hops} hops` : "");
  $("retrieval").checked = about.retrieval;
  $("retrieval").disabled = !about.retrieval;
}

function showSources(sources, cited) {
  const list = $("sources");
  list.replaceChildren();
  for (const s of sources) {
    const li = el("li");
    li.value = s.n;
    li.dataset.id = s.id;
    li.append(el("span", "title", s.title), el("span", "muted", ` (${s.id})`));
    if (cited && cited.includes(s.n)) { li.classList.add("cited"); li.append(el("span", "cite-tag", "cited")); }
    li.append(el("div", "text", s.text));
    list.append(li);
  }
}

function showOutcome(x) {
  const status = $("status");
  status.replaceChildren();
  const confidence = x.confidence === null ? "undefined (the model's probabilities are not finite)"
                                           : x.confidence.toFixed(2);
  if (x.below_threshold) {
    status.append(el("div", "abstained", `Abstained: the confidence ${confidence} is below the threshold ${x.threshold}.`));
  } else if (x.abstained) {
    status.append(el("div", "abstained", "Abstained: the documents shown do not hold the answer."));
  } else if (x.over_abstention) {
    status.append(el("div", "", "The model began to abstain, but its confidence is at or above the threshold: this is its best other answer."));
  }
  status.append(el("div", "", `confidence: ${confidence}` + (x.threshold === null ? "" : ` (abstains below ${x.threshold})`)));
  if (x.citations.length) status.append(el("div", "", "cited: " + x.citations.map((n) => `[${n}]`).join(" ")));
  if (x.mode === "closed-book") status.append(el("div", "muted", "closed-book: no documents were shown to the model"));
  if (x.dropped) status.append(el("div", "muted", `${x.dropped} lower-ranked documents did not fit the context`));
  showSources(x.sources, x.citations);
  $("hops").replaceChildren();
  if (x.hops.length > 1) x.hops.forEach((h, i) => showHop(h, i === 0));
}

// One hop of a multi-hop reply: streamed as its query is answered, listed again with the outcome.
function showHop(h, isQuestion) {
  const found = h.documents.length ? "found " + h.documents.map((n) => `[${n}]`).join(" ") : "found nothing";
  const status = h.status === "ok" ? "" : ` (${h.status.replaceAll("_", " ")}: not retrieved)`;
  $("hops").append(el("li", "", (isQuestion ? "question: " : "query: ") + h.query + status + " → " + found));
}

// Server-sent events: "data: <json>" blocks separated by a blank line; "data: [DONE]" ends the stream.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

async function ask(event) {
  event.preventDefault();
  if (!model) await connect();
  if (!model) return;
  const answer = $("answer"), status = $("status");
  answer.textContent = ""; status.replaceChildren(el("span", "muted", "…")); $("hops").replaceChildren();
  $("sources").replaceChildren(); $("ask").disabled = true;
  try {
    const response = await fetch("/v1/chat/completions", {method: "POST", headers: headers(), body: JSON.stringify({
      model: model.id, stream: true, retrieval: $("retrieval").checked,
      messages: [{role: "user", content: $("question").value}]})});
    if (!response.ok) {
      needKey(response);
      status.replaceChildren(el("span", "error", await errorText(response)));
      return;
    }
    for await (const chunk of events(response)) {
      if (chunk.error) { status.replaceChildren(el("span", "error", chunk.error.message)); return; }
      const x = chunk.hybridchat, delta = chunk.choices[0].delta;
      if (delta.content) answer.textContent += delta.content;
      if (x && chunk.choices[0].finish_reason) showOutcome(x);
      else if (x && x.hop) showHop(x.hop, false);
      else if (x && x.sources) showSources(x.sources, []);
    }
  } catch (e) {
    status.replaceChildren(el("span", "error", "the connection failed: " + e));
  } finally {
    $("ask").disabled = false;
  }
}

async function search(event) {
  event.preventDefault();
  const list = $("search-results");
  const response = await fetch("/search", {method: "POST", headers: headers(),
                                           body: JSON.stringify({query: $("search-query").value})});
  if (!response.ok) { needKey(response); list.replaceChildren(el("li", "error", await errorText(response))); return; }
  list.replaceChildren();
  for (const r of (await response.json()).results) {
    const li = el("li");
    li.dataset.id = r.id;
    li.append(el("span", "title", r.title), el("span", "muted", ` (${r.id}, score ${r.score.toFixed(2)})`),
              el("div", "text", r.text));
    list.append(li);
  }
  if (!list.children.length) list.append(el("li", "muted", "nothing found"));
}

$("apikey").addEventListener("change", () => { localStorage.setItem("hybridchat-key", $("apikey").value); connect(); });
$("ask-form").addEventListener("submit", ask);
$("search-form").addEventListener("submit", search);
connect();
