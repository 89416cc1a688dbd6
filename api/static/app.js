// The chat page: talks to this server's OpenAI-compatible API, streaming answers over SSE.
// No framework and no build step: plain DOM and fetch + ReadableStream.
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = [];      // [{role, content}] sent with every request
let controller = null;        // AbortController of the answer being streamed
let ready = false;

// -- server state: loading progress, model panel, route ---------------------------------------------
function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function setStatus(text, kind) {
  const badge = $("status");
  badge.textContent = text;
  badge.className = "badge " + (kind || "");
}

async function pollHealth() {
  let state;
  try {
    const r = await fetch("/health", { cache: "no-store" });
    state = await r.json();
  } catch (e) {
    setStatus("server unreachable", "failed");
    setTimeout(pollHealth, 2000);
    return;
  }
  if (state.status === "ok" || state.status === "degraded") {  // degraded: the last answer lost its route
    $("loading").hidden = true;
    if (state.status === "ok") setStatus("ready", "ok"), $("status").title = "";
    else setStatus("degraded", "loading"), $("status").title = state.reason || "";
    if (!ready) loadInfo();
    ready = true;
    setTimeout(pollHealth, 5000);  // and on: a server that stops or degrades later is shown so
    return;
  }
  if (state.status === "failed") {
    $("loading").hidden = false;
    $("loading-stage").textContent = "the model failed to load: " + state.error;
    $("loading-bar").hidden = true;
    setStatus("failed", "failed");
    return;
  }
  showLoading(state);
  loadInfo();
  setTimeout(pollHealth, 1000);
}

function showLoading(state) {
  $("loading").hidden = false;
  setStatus("loading", "loading");
  $("loading-stage").textContent = state.stage || "loading the model…";
  const bar = $("loading-bar");
  if (state.total) {
    bar.max = state.total;
    bar.value = state.done || 0;
    const amount = (n) => (state.unit === "B" ? (n / 1e6).toFixed(1) + " MB" : String(n));
    $("loading-detail").textContent = `${amount(state.done)} of ${amount(state.total)} ` +
      `(${Math.round(100 * state.progress)}%), ${state.elapsed_s} s`;
  } else {
    bar.removeAttribute("value");  // indeterminate
    $("loading-detail").textContent = state.elapsed_s !== undefined ? `${state.elapsed_s} s` : "";
  }
}

const SHOWN_FIRST = ["name", "architecture", "quantization", "fragments", "source", "file", "file_size",
                     "parameters", "context_length"];

async function loadInfo() {
  const r = await fetch("/info", { headers: headers(), cache: "no-store" });
  if (r.status === 401) {
    fillList($("model-info"), [["access", "this server needs an API key: enter it under Settings"]]);
    return;
  }
  const data = await r.json();
  if (!data.info) return;
  $("model-name").textContent = data.model;
  const info = data.info;
  const keys = SHOWN_FIRST.filter((k) => k in info).concat(
    Object.keys(info).filter((k) => !SHOWN_FIRST.includes(k) && k !== "route"));
  const rows = keys.map((k) => [k, k === "file_size" ? megabytes(info[k]) : k === "sha256" ? short(info[k]) : show(info[k])]);
  rows.push(["served context", data.context + " tokens"], ["slots", String(data.parallel)]);
  fillList($("model-info"), rows);
  applyDefaults(data.defaults);
  showRoute(info.route);
}

function megabytes(n) {
  return typeof n === "number" ? (n / 1e6).toFixed(1) + " MB" : show(n);
}

function short(hash) {
  return typeof hash === "string" && hash.length > 16 ? hash.slice(0, 16) + "…" : show(hash);
}

function show(v) {
  return typeof v === "object" && v !== null ? JSON.stringify(v) : String(v);
}

function fillList(dl, rows) {
  dl.replaceChildren();
  for (const [k, v] of rows) {
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = k;
    dd.textContent = v;
    dl.append(dt, dd);
  }
}

let defaultsApplied = false;
function applyDefaults(defaults) {
  if (defaultsApplied || !defaults) return;
  defaultsApplied = true;
  for (const [k, v] of Object.entries(defaults)) {
    const input = $(k);
    if (input && !input.dataset.touched) input.value = v;
  }
}

let hasRoute = false;
function showRoute(route) {
  hasRoute = Boolean(route);
  // The route of a distributed source: one row per node (whatever columns it reports: node, blocks, ms/token).
  if (route && !Array.isArray(route)) route = [route];
  if (!route || route.length === 0) return;
  $("route-panel").hidden = false;
  route = route.map((hop) => (typeof hop === "object" && hop !== null ? hop : { hop }));
  const cols = [...new Set(route.flatMap((hop) => Object.keys(hop)))];
  const table = $("route");
  table.replaceChildren();
  const head = table.insertRow();
  for (const c of cols) {
    const th = document.createElement("th");
    th.textContent = c;
    head.append(th);
  }
  for (const hop of route) {
    const row = table.insertRow();
    for (const c of cols) row.insertCell().textContent = hop[c] === undefined ? "" : show(hop[c]);
  }
}

// -- chatting ---------------------------------------------------------------------------------------
function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("messages").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function number(id, parse) {
  const raw = $(id).value.trim();
  if (raw === "") return undefined;
  const v = parse(raw);
  return Number.isFinite(v) ? v : undefined;
}

function requestBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...conversation);
  // From the second turn on, the server's slot keeps the conversation so far in its cache and
  // prefills only the new messages (llama-server's cache_prompt).
  const body = { messages, stream: true, stream_options: { include_usage: true },
                 cache_prompt: conversation.length > 1 };
  // Number, not parseInt: "1e3" is 1000 (parseInt read 1); "1.5" goes as is and the server names the field
  for (const k of ["temperature", "top_p", "min_p", "repeat_penalty", "top_k", "max_tokens", "seed"]) {
    body[k] = number(k, Number);
  }
  return body;
}

async function send(event) {
  event.preventDefault();
  const text = $("prompt").value;
  if (!text.trim() || controller) return;
  $("prompt").value = "";
  const turn = conversation.length;  // where this turn's messages go
  conversation.push({ role: "user", content: text });
  const asked = addMessage("user", text);
  const bubble = addMessage("assistant", "");
  bubble.dataset.state = "streaming";
  controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  let answer = "";
  let note = "";
  let failed = false;
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody()), signal: controller.signal,
    });
    if (!r.ok) {
      const err = await r.json().catch(() => ({ error: { message: r.statusText } }));
      throw new Error(`${r.status}: ${err.error ? err.error.message : r.statusText}`);
    }
    for await (const chunk of events(r.body)) {
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices && chunk.choices[0];
      if (choice && choice.delta && choice.delta.content) {
        answer += choice.delta.content;
        bubble.textContent = answer;
        bubble.scrollIntoView({ block: "end" });
      }
      if (choice && choice.finish_reason) note = choice.finish_reason === "length" ? "(stopped: token limit)" : "";
      if (chunk.timings) showStats(chunk.timings);
    }
  } catch (e) {
    if (e.name === "AbortError") {
      note = "(stopped)";
    } else {
      failed = true;
      addMessage("error", String(e.message || e));
    }
  } finally {
    if (failed && bubble.isConnected) {
      // A failed turn leaves the conversation (it would be sent again with every later message,
      // and a message too long for the context would fail them all); its text goes back to the box.
      conversation.length = turn;
      asked.classList.add("failed");
      bubble.remove();
      if (!$("prompt").value) $("prompt").value = text;
    } else if (bubble.isConnected) {
      conversation.push({ role: "assistant", content: answer });  // not after Clear
    }
    if (note) {
      const span = document.createElement("span");
      span.className = "note";
      span.textContent = note;
      bubble.append(span);
    }
    bubble.dataset.state = "done";
    if (hasRoute) loadInfo();  // the route's ms per token were measured during this answer
    controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
    $("prompt").focus();
  }
}

// Server-sent events from a fetch body: yields each "data:" payload parsed, until [DONE].
async function* events(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

function showStats(t) {
  const reused = t.cache_n ? ` (+${t.cache_n} from the cache)` : "";
  $("stats").textContent = `prompt ${t.prompt_n} tokens${reused} at ${t.prompt_per_second} tok/s · ` +
    `answer ${t.predicted_n} tokens at ${t.predicted_per_second} tok/s`;
}

function stop() {
  if (controller) controller.abort();
}

function clear() {
  stop();
  conversation.length = 0;
  $("messages").replaceChildren();
  $("stats").textContent = "";
}

$("composer").addEventListener("submit", send);
$("stop").addEventListener("click", stop);
$("clear").addEventListener("click", clear);
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) send(e);  // (Enter that ends an IME composition)
});
for (const input of document.querySelectorAll("aside input")) {
  input.addEventListener("input", () => { input.dataset.touched = "1"; });
}
$("api_key").addEventListener("change", () => { if (ready) loadInfo(); });
pollHealth();
