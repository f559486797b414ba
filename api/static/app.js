// The page of `swarm api`: the swarm at a glance (GET v1/swarm, the JSON of `swarm status --json`,
// refreshed every 2 s) and a chat box streaming from POST v1/chat/completions (server-sent events in
// OpenAI's chunk format). Plain JS, no framework, no network beyond this server.
// Everything shown from the swarm comes from strangers (names, numbers): it is written with
// textContent only, never as HTML.
"use strict";

const REFRESH_MS = 2000;
const STATUS_TIMEOUT_MS = 15000;
const KEY_STORE = "swarm-api-key";

const $ = (id) => document.getElementById(id);
const conversation = [];  // {role, content} sent in full with every request
let chatAbort = null;     // AbortController of the request streaming now
let refreshes = 0;
let lastOk = 0;
let swarmModel = "";      // the swarm's model id (v1/swarm)
let apiModel = "";        // the base model's name in the API (v1/models)

// ---- API access -------------------------------------------------------------------------------

function headers(extra) {
  const h = Object.assign({}, extra);
  const key = localStorage.getItem(KEY_STORE);
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

// The message of an OpenAI-shaped error body ({"error": {"message"}}), or the status line.
async function apiError(resp) {
  let message = resp.status + " " + resp.statusText;
  try {
    const body = await resp.json();
    if (body && body.error) message = String(body.error.message || body.error);
  } catch (_) { /* not JSON: keep the status line */ }
  if (resp.status === 401) askForKey();
  return new ApiError(resp.status, message);
}

async function getJson(path, timeoutMs) {
  const resp = await fetch(path, { headers: headers(), signal: AbortSignal.timeout(timeoutMs) });
  if (!resp.ok) throw await apiError(resp);
  return resp.json();
}

function askForKey() {
  $("key-box").hidden = false;
  $("api-key").focus();
}

// ---- the swarm ----------------------------------------------------------------------------------

function text(tag, content, cls) {
  const el = document.createElement(tag);
  el.textContent = content;
  if (cls) el.className = cls;
  return el;
}

const num = (x, fallback = 0) => (typeof x === "number" && isFinite(x) ? x : fallback);
const range = (r) => (Array.isArray(r) && r.length === 2 ? num(r[0]) + ":" + num(r[1]) : "?");

function weights(s) {
  const quant = String(s.quant || "none");
  const kind = quant === "none" ? String(s.dtype || "?") : quant;
  const size = num(s.weight_bytes);
  if (!size) return kind;
  return size >= 2 ** 30 / 10 ? `${kind} ${(size / 2 ** 30).toFixed(2)} GB` : `${kind} ${Math.round(size / 2 ** 20)} MB`;
}

// tokens/s, marked "=" when given with --throughput and "*" when the network part is assumed
function speed(s) {
  let mark = s.throughput_source === "given" ? "=" : "";
  if (s.bandwidth_source === "assumed") mark += "*";
  return Math.round(num(s.throughput)) + mark;
}

function ago(seconds) {
  seconds = Math.max(0, seconds);
  if (seconds < 120) return Math.round(seconds) + " s ago";
  if (seconds < 7200) return Math.round(seconds / 60) + " min ago";
  return Math.round(seconds / 3600) + " h ago";
}

function nameCell(name) {
  const full = String(name || "").slice(0, 256);
  const td = text("td", full || "–", "name");
  if (full) td.title = full;
  return td;
}

const stateClass = (state) => "state-" + (state === "online" ? "ok" : state === "joining" ? "warn" : "bad");

// a server's blocks drawn to scale over the model's blocks
function rangeBar(blocks, n, state) {
  const bar = document.createElement("span");
  bar.className = "range";
  bar.setAttribute("aria-hidden", "true");
  if (Array.isArray(blocks) && n > 0) {
    const fill = document.createElement("span");
    fill.className = stateClass(state);
    const lo = Math.min(Math.max(num(blocks[0]), 0), n), hi = Math.min(Math.max(num(blocks[1]), lo), n);
    fill.style.left = (100 * lo / n) + "%";
    fill.style.width = (100 * (hi - lo) / n) + "%";
    bar.append(fill);
  }
  return bar;
}

function blocksCell(blocks, n, state) {
  const td = text("td", range(blocks), "num mono");
  td.append(rangeBar(blocks, n, state));
  return td;
}

function renderServers(servers, n) {
  const rows = servers.map((s) => {
    const tr = document.createElement("tr");
    const peer = String(s.peer_id || "");
    tr.dataset.peerId = peer;
    tr.dataset.state = String(s.state || "");
    const peerCell = text("td", "…" + peer.slice(-6), "mono");
    peerCell.title = peer;
    const state = text("td", "");
    state.append(text("span", String(s.state || "?"), "badge " + stateClass(s.state)));
    tr.append(
      peerCell,
      nameCell(s.name),
      blocksCell(s.blocks, n, s.state),
      state,
      text("td", weights(s)),
      text("td", speed(s), "num"),
      text("td", `${num(s.sessions)} · ${Math.round(num(s.served))}/s`, "num"),
      text("td", String(num(s.cache_tokens_left)), "num"),
      text("td", s.rtt_ms == null ? "–" : num(s.rtt_ms).toFixed(1) + " ms", "num"),
    );
    return tr;
  });
  $("server-rows").replaceChildren(...rows);
  $("servers-caption").textContent = servers.length === 1 ? "1 server" : servers.length + " servers";
}

function renderCoverage(data) {
  const n = Math.max(0, Math.min(num(data.num_blocks), 10000));
  const gaps = Array.isArray(data.gaps) ? data.gaps : [];
  const low = (data.bottleneck && Array.isArray(data.bottleneck.blocks)) ? data.bottleneck.blocks : [];
  const everyBlock = low.length === 1 && num(low[0][0]) === 0 && num(low[0][1]) === n;  // nothing to point at
  const inRanges = (b, ranges) => ranges.some((r) => b >= r[0] && b < r[1]);
  const cover = Array.isArray(data.coverage) ? data.coverage : [];
  const bar = $("coverage");
  bar.style.setProperty("--blocks", Math.max(n, 1));
  const cells = [];
  for (let b = 0; b < n; b++) {
    const cell = document.createElement("span");
    const served = !inRanges(b, gaps);
    cell.className = "cell " + (served ? "served" : "gap") + (served && !gaps.length && !everyBlock && inRanges(b, low) ? " low" : "");
    cell.dataset.block = b;
    cell.dataset.served = served;
    cell.title = `block ${b}: ` + (served ? `${Math.round(num(cover[b]))} tok/s in total` : "nobody serves it");
    cells.push(cell);
  }
  bar.replaceChildren(...cells);
  $("tick-first").textContent = n ? "0" : "";
  $("tick-last").textContent = n || "";
  const full = gaps.length === 0 && n > 0;
  const gapText = gaps.map(range).join(", ");
  const g = $("gaps");
  g.dataset.full = full;
  g.className = full ? "ok" : "error";
  g.textContent = full ? `All ${n} blocks served.` : `Gaps: blocks ${gapText} have no server.`;
  bar.setAttribute("aria-label", full ? `all ${n} blocks served` : `${n} blocks, unserved: ${gapText}`);

  const bn = data.bottleneck;
  $("bottleneck").textContent = full && bn && low.length
    ? `Bottleneck: ${Math.round(num(bn.throughput))} tok/s (total of the servers) at blocks ${low.map(range).join(", ")}.`
    : "";
}

function renderNotes(data) {
  const servers = data.servers;
  const notes = [];
  if (servers.some((s) => s.bandwidth_source === "assumed"))
    notes.push("* network speed assumed (no peer to measure the link against yet)");
  if (servers.some((s) => s.throughput_source === "given"))
    notes.push("= speed given with --throughput, not measured");
  $("notes").textContent = notes.join("  ");
  const now = Date.now() / 1000;
  const moves = (Array.isArray(data.moves) ? data.moves : []).slice(0, 5).map((m) => text("li",
    `…${String(m.peer_id || "").slice(-6)} moved ${range(m.from)} → ${range(m.to)} ${ago(now - num(m.time))}`));
  $("moves").replaceChildren(...moves);
}

function renderSwarm(data) {
  if (!data || !Array.isArray(data.servers)) throw new ApiError(0, "unexpected answer from v1/swarm");
  swarmModel = String(data.model || "");
  $("model-name").textContent = `${apiModel || String(data.model_name || "") || swarmModel} · ${num(data.num_blocks)} blocks`;
  $("model-name").title = "model id in the swarm: " + swarmModel;
  renderServers(data.servers, num(data.num_blocks));
  renderCoverage(data);
  renderNotes(data);
}

function setLive(state, message) {
  const live = $("live");
  live.dataset.state = state;
  live.dataset.refreshes = refreshes;
  live.textContent = message;
}

async function refresh() {
  try {
    renderSwarm(await getJson("v1/swarm", STATUS_TIMEOUT_MS));
    refreshes += 1;
    lastOk = Date.now();
    $("swarm-error").hidden = true;
    setLive("live", "live · updated " + new Date(lastOk).toLocaleTimeString());
  } catch (err) {
    const e = $("swarm-error");
    e.textContent = "Cannot read the swarm: " + err.message;
    e.hidden = false;
    setLive("error", err.status === 401 ? "waiting for an API key"
      : lastOk ? "stale · last update " + new Date(lastOk).toLocaleTimeString() : "no answer");
  } finally {
    // the next refresh starts when this one ended (no pile-up on a slow swarm); none while hidden
    setTimeout(function again() {
      if (document.hidden) setTimeout(again, 500); else refresh();
    }, REFRESH_MS);
  }
}

async function loadModels() {
  try {
    const body = await getJson("v1/models", STATUS_TIMEOUT_MS);
    const list = Array.isArray(body.data) ? body.data : [];
    const ids = list.map((m) => String(m.id));
    const base = list.find((m) => m.parent == null);  // adapters name their base model as parent
    apiModel = base ? String(base.id) : "";
    $("model").replaceChildren(...ids.map((id) => {
      const opt = text("option", id);
      opt.value = id;
      return opt;
    }));
  } catch (err) {
    setTimeout(loadModels, REFRESH_MS);  // e.g. waiting for a key
  }
}

// ---- the chat -----------------------------------------------------------------------------------

function addMessage(role, content) {
  $("chat-empty")?.remove();
  const msg = document.createElement("div");
  msg.className = "msg " + role;
  msg.dataset.role = role;
  msg.append(text("div", role === "user" ? "You" : "Model", "who"));
  const body = text("div", content, "body");
  msg.append(body);
  $("messages").append(msg);
  msg.scrollIntoView({ block: "end" });
  return msg;
}

function setStreaming(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
  $("prompt").readOnly = on;
}

// Reads server-sent events from a fetch body; calls onData(payload) for every `data:` line.
async function readEvents(resp, onData) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    const lines = buffer.split(/\r?\n/);
    buffer = lines.pop();
    for (const line of lines) {
      if (!line.startsWith("data:")) continue;  // blank separators, ": keep-alive" comments
      if (onData(line.slice(5).trim()) === false) return;
    }
  }
}

async function send(content) {
  const request = {
    model: $("model").value || swarmModel,
    messages: conversation.concat([{ role: "user", content }]),
    stream: true,
    max_tokens: Math.max(1, parseInt($("max-tokens").value, 10) || 256),
    temperature: Math.max(0, parseFloat($("temperature").value) || 0),
  };
  addMessage("user", content);
  const msg = addMessage("assistant", "");
  const body = msg.querySelector(".body");
  msg.dataset.state = "streaming";
  msg.dataset.chunks = 0;
  let answer = "";
  chatAbort = new AbortController();
  setStreaming(true);
  try {
    const resp = await fetch("v1/chat/completions", {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify(request),
      signal: chatAbort.signal,
    });
    if (!resp.ok) throw await apiError(resp);
    await readEvents(resp, (payload) => {
      if (payload === "[DONE]") return false;
      const chunk = JSON.parse(payload);
      if (chunk.error) throw new ApiError(0, String(chunk.error.message || chunk.error));
      const choice = (chunk.choices || [])[0] || {};
      const delta = (choice.delta && choice.delta.content) || "";
      if (delta) {
        answer += delta;
        body.textContent = answer;
        msg.dataset.chunks = Number(msg.dataset.chunks) + 1;
        msg.scrollIntoView({ block: "end" });
      }
      if (choice.finish_reason) msg.dataset.finish = choice.finish_reason;
    });
    msg.dataset.state = "done";
    if (msg.dataset.finish === "length") msg.append(text("div", "cut at max tokens", "note"));
  } catch (err) {
    if (err.name === "AbortError") {
      msg.dataset.state = "stopped";
      msg.append(text("div", "stopped", "note"));
    } else {
      msg.dataset.state = "error";
      msg.append(text("div", "Error: " + err.message, "note error"));
    }
  } finally {
    chatAbort = null;
    setStreaming(false);
  }
  if (msg.dataset.state !== "error") {  // a failed turn is left out, so sending again retries it
    conversation.push({ role: "user", content }, { role: "assistant", content: answer });
  }
  return msg.dataset.state;
}

function setupChat() {
  const prompt = $("prompt");
  $("chat-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const content = prompt.value.trim();
    if (!content || chatAbort) return;
    const state = await send(content);
    if (state !== "error") prompt.value = "";
    prompt.focus();
  });
  prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("chat-form").requestSubmit();
    } else if (event.key === "Escape" && chatAbort) {
      chatAbort.abort();
    }
  });
  $("stop").addEventListener("click", () => chatAbort && chatAbort.abort());
  $("clear").addEventListener("click", () => {
    if (chatAbort) chatAbort.abort();
    conversation.length = 0;
    $("messages").replaceChildren(text("p", "New conversation.", "muted"));
    prompt.focus();
  });
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("api-key").value.trim();
    if (key) localStorage.setItem(KEY_STORE, key); else localStorage.removeItem(KEY_STORE);
    $("key-box").hidden = true;
    loadModels();
  });
}

setupChat();
loadModels();
refresh();
