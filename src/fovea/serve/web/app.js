// fovea's web page: drop a document, ask, watch the answer stream, see the cost and where the bridge looked.
// Plain browser JavaScript over fovea's own HTTP API (the OpenAI chat endpoint plus /v1/fovea/*): no build step,
// nothing fetched from another origin.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_SLOT = "fovea-api-key"; // sessionStorage: the key lives as long as this tab, never on disk
// Types the browser draws itself; anything else (PDF, TIFF) is rendered to page images by the server.
const BROWSER_IMAGES = ["image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp"];
// The stages of one answer, in the order they happen, with the colour class of their bar segment.
const STAGES = [
  ["preprocess", "preprocess"], ["encode", "encode"], ["compress", "compress"], ["wait", "queue"],
  ["prefill", "prefill"], ["decode", "decode"],
];
const STATUS_WORDS = {
  400: "The server refused the request", 401: "The API key is missing or wrong", 404: "Not found",
  408: "The upload stalled", 413: "The upload is too large for this server", 422: "The request is malformed",
  429: "The server is busy", 500: "The server failed", 503: "The server is overloaded",
};

const state = { key: sessionStorage.getItem(KEY_SLOT) || "", info: null, doc: null, busy: false };

class ApiFailure extends Error {
  constructor(status, message, retryAfter) {
    super(message);
    this.status = status;
    this.retryAfter = retryAfter;
  }
}

function headers(json) {
  const h = json ? { "Content-Type": "application/json" } : {};
  if (state.key) h.Authorization = "Bearer " + state.key;
  return h;
}

async function failure(resp) {
  let message = resp.statusText || "no message";
  try {
    const body = await resp.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) { /* not JSON: keep the status text */ }
  return new ApiFailure(resp.status, message, resp.headers.get("Retry-After"));
}

// GET when body is undefined, else POST JSON; a non-2xx answer throws an ApiFailure carrying the server's message.
async function api(path, body) {
  const init = body === undefined ? { headers: headers(false) }
    : { method: "POST", headers: headers(true), body: JSON.stringify(body) };
  const resp = await fetch(path, init);
  if (!resp.ok) throw await failure(resp);
  return resp;
}

function explain(err) {
  if (typeof err === "string") return err;
  if (err instanceof ApiFailure) {
    const what = STATUS_WORDS[err.status] || "The server answered " + err.status;
    let text = `${what} (HTTP ${err.status}): ${err.message}`;
    if (err.status === 429 && err.retryAfter) text += ` Try again in ${err.retryAfter} s.`;
    return text;
  }
  return "Could not reach the server: " + (err && err.message ? err.message : err);
}

function showError(err) {
  const box = $("error");
  box.textContent = explain(err);
  box.hidden = false;
  if (err instanceof ApiFailure && err.status === 401) askKey();
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function askKey() {
  const dialog = $("key-dialog");
  $("key-input").value = state.key;
  if (!dialog.open) dialog.showModal();
  $("key-input").focus();
}

async function connect() {
  try {
    state.info = await (await api("/v1/fovea/info")).json();
  } catch (err) {
    state.info = null;
    $("model-info").textContent = err.status === 401 ? "this server needs an API key" : "not connected";
    showError(err);
    updateAsk();
    return;
  }
  clearError();
  const i = state.info;
  const tokens = i.visual_token_budget ? `${i.visual_token_budget} visual tokens a page` : "one visual token per grid cell";
  $("model-info").textContent = `${i.model}: ${i.encoder} \u2192 ${i.connector} (${tokens}), pages up to ` +
    `${i.max_side}px; limits: ${i.limits.max_pages} pages, ${i.limits.max_body_mb} MB a request`;
  updateAsk();
}

function updateAsk() {
  $("ask").disabled = state.busy || !state.info || !state.doc;
}

function readDataUri(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function openFile(file) {
  clearError();
  if (!state.info) {
    showError("Not connected to the server yet" + (state.key ? "." : ": set the API key first."));
    return;
  }
  const limit = state.info.limits.max_body_mb * 1048576;
  const sent = Math.ceil(file.size / 3) * 4; // base64 in a JSON body
  if (sent > limit) {
    showError(`${file.name} is ${(file.size / 1048576).toFixed(1)} MB; as base64 it would be ` +
      `${(sent / 1048576).toFixed(1)} MB, over this server's ${state.info.limits.max_body_mb} MB request limit ` +
      "(--max-body-mb).");
    return;
  }
  const dataUri = await readDataUri(file);
  const drawn = BROWSER_IMAGES.includes(file.type);
  let pages;
  if (drawn) {
    pages = [{ page: 1, image: dataUri }];
  } else {
    $("doc-name").textContent = `${file.name}: rendering pages\u2026`;
    try {
      pages = (await (await api("/v1/fovea/pages", { file_data: dataUri, filename: file.name })).json()).pages;
    } catch (err) {
      $("doc-name").textContent = "";
      showError(err);
      return;
    }
  }
  state.doc = { name: file.name, dataUri, drawn, pages };
  $("doc-name").textContent = pages.length > 1 ? `${file.name} (${pages.length} pages)` : file.name;
  renderPages();
  $("turns").replaceChildren();
  updateAsk();
  $("question").focus();
}

function renderPages() {
  const holder = $("pages");
  holder.replaceChildren();
  state.doc.pages.forEach((p, i) => {
    const figure = document.createElement("figure");
    figure.className = "page";
    const frame = document.createElement("div");
    frame.className = "page-frame";
    const img = document.createElement("img");
    img.src = p.image;
    img.alt = `page ${p.page}`;
    img.dataset.testid = "page-image";
    const heat = document.createElement("canvas");
    heat.className = "heat";
    heat.id = `heat-${i}`;
    frame.append(img, heat);
    const caption = document.createElement("figcaption");
    caption.textContent = `Page ${p.page}`;
    figure.append(frame, caption);
    holder.append(figure);
  });
}

function documentPart() {
  const d = state.doc;
  return d.drawn ? { type: "image_url", image_url: { url: d.dataUri } }
    : { type: "file", file: { file_data: d.dataUri, filename: d.name } };
}

function addTurn(question) {
  const turn = document.createElement("div");
  turn.className = "turn";
  turn.innerHTML = '<div class="q"></div><div class="a streaming" data-chunks="0"></div><div class="cost"></div>' +
    '<div class="looked hint"></div>';
  turn.querySelector(".q").textContent = question;
  $("turns").append(turn);
  turn.scrollIntoView({ block: "end" });
  return { answer: turn.querySelector(".a"), cost: turn.querySelector(".cost"), looked: turn.querySelector(".looked") };
}

// Server-sent events from a fetch body: calls onData with each parsed "data:" payload until [DONE].
async function readEvents(resp, onData) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
  }
}

function stageTimes(usage, m) {
  const decode = m.decode_tokens_per_s > 0 ? 1000 * Math.max(usage.completion_tokens - 1, 0) / m.decode_tokens_per_s : 0;
  const before = m.preprocess_ms + m.encode_ms + m.compress_ms + m.prefill_ms;
  return {
    preprocess: m.preprocess_ms, encode: m.encode_ms, compress: m.compress_ms,
    wait: Math.max(m.ttft_ms - before, 0), prefill: m.prefill_ms, decode,
  };
}

function renderCost(box, usage, m) {
  if (!m) return;
  const ms = stageTimes(usage, m);
  const total = Object.values(ms).reduce((a, b) => a + b, 0) || 1;
  const bar = document.createElement("div");
  bar.className = "bar";
  bar.dataset.testid = "timing-bar";
  const legend = document.createElement("div");
  legend.className = "legend";
  for (const [cls, label] of STAGES) {
    const seg = document.createElement("div");
    seg.className = `seg ${cls}`;
    seg.style.width = `${(100 * ms[cls]) / total}%`;
    seg.dataset.ms = ms[cls].toFixed(1);
    seg.title = `${label} ${ms[cls].toFixed(0)} ms`;
    bar.append(seg);
    if (cls === "wait" && ms.wait < 1) continue;
    const item = document.createElement("span");
    item.innerHTML = `<i class="seg ${cls}"></i>`;
    item.append(`${label} ${ms[cls].toFixed(0)} ms`);
    legend.append(item);
  }
  const ttft = document.createElement("div");
  ttft.className = "ttft";
  ttft.style.left = `${Math.min((100 * m.ttft_ms) / total, 99.5)}%`;
  ttft.title = `first token at ${m.ttft_ms.toFixed(0)} ms`;
  bar.append(ttft);
  const summary = document.createElement("div");
  summary.className = "summary";
  summary.dataset.ttftMs = m.ttft_ms.toFixed(1);
  summary.dataset.visualTokens = String(usage.visual_tokens);
  summary.textContent = `TTFT ${m.ttft_ms.toFixed(0)} ms \u00b7 ${usage.visual_tokens} visual tokens \u00b7 ` +
    `${usage.prompt_tokens} prompt tokens \u00b7 ${usage.completion_tokens} generated` +
    (m.decode_tokens_per_s > 0 ? ` at ${m.decode_tokens_per_s.toFixed(1)} tokens/s` : "");
  const caches = document.createElement("div");
  caches.className = "caches";
  const cached = usage.prompt_tokens_details ? usage.prompt_tokens_details.cached_tokens : 0;
  const reused = [];
  if (m.encoder_cache_hits > 0) reused.push(`${m.encoder_cache_hits} page(s) from the encoder cache (not encoded again)`);
  if (cached > 0) reused.push(`${cached} of ${usage.prompt_tokens} prompt tokens from the prefix cache`);
  caches.textContent = reused.length ? "Reused: " + reused.join("; ") + "." : "Nothing reused: first look at this document.";
  box.replaceChildren(summary, bar, legend, caches);
}

async function ask(question) {
  const turn = addTurn(question);
  const messages = [{ role: "user", content: [documentPart(), { type: "text", text: question }] }];
  const body = {
    model: state.info.model, messages, stream: true, stream_options: { include_usage: true },
    max_tokens: Number($("max-tokens").value) || 128,
  };
  let ok = true;
  try {
    const resp = await api("/v1/chat/completions", body);
    await readEvents(resp, (chunk) => {
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        turn.answer.append(delta.content);
        turn.answer.dataset.chunks = String(Number(turn.answer.dataset.chunks) + 1);
      }
      if (chunk.usage) renderCost(turn.cost, chunk.usage, chunk.fovea_metrics);
    });
  } catch (err) {
    ok = false;
    turn.answer.classList.add("failed");
    turn.answer.textContent = "no answer (see the message above)";
    showError(err);
  }
  turn.answer.classList.remove("streaming");
  turn.answer.dataset.done = "1";
  if (ok && $("look").checked) await look(messages, turn.looked);
}

// Where the bridge's queries looked, for this question, as a heat map over each page.
async function look(messages, note) {
  note.textContent = "Finding where it looked\u2026";
  let found;
  try {
    found = await (await api("/v1/fovea/attention", { model: state.info.model, messages })).json();
  } catch (err) {
    note.textContent = "";
    showError(err);
    return;
  }
  const missing = found.images.find((e) => !e.applies);
  if (missing) {
    note.textContent = `Where it looked does not apply: ${missing.reason}.`;
    note.dataset.applies = "0";
    return;
  }
  found.images.forEach((entry, i) => drawHeat($(`heat-${i}`), entry));
  note.textContent = `Heat map: where the ${found.connector} queries looked for this question ` +
    `(share of their cross-attention on each cell of the ${found.images[0].grid.width}x` +
    `${found.images[0].grid.height} encoder grid).`;
  note.dataset.applies = "1";
}

// The grid covers the model's input canvas; the page sits in its content box (top-left, or centred), so each cell
// is placed in page coordinates before it is drawn over the picture.
function drawHeat(canvas, entry) {
  if (!canvas) return;
  const { input, content, grid, weights } = entry;
  canvas.width = content.width;
  canvas.height = content.height;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const left = entry.pad_position === "center" ? Math.floor((input.width - content.width) / 2) : 0;
  const top = entry.pad_position === "center" ? Math.floor((input.height - content.height) / 2) : 0;
  const cw = input.width / grid.width;
  const ch = input.height / grid.height;
  let peak = -Infinity;
  let low = Infinity;
  let at = [0, 0];
  weights.forEach((row, y) => row.forEach((v, x) => {
    if (v > peak) { peak = v; at = [x, y]; }
    low = Math.min(low, v);
  }));
  // Scaled from the coolest to the hottest cell: attention spread almost evenly still shows where it leaned.
  const span = peak - low;
  weights.forEach((row, y) => row.forEach((v, x) => {
    const s = span > 0 ? (v - low) / span : 1;
    ctx.fillStyle = `rgba(255, ${Math.round(220 * (1 - s))}, ${Math.round(60 * (1 - s))}, ${(0.04 + 0.6 * s).toFixed(3)})`;
    ctx.fillRect(x * cw - left, y * ch - top, cw, ch);
  }));
  canvas.dataset.drawn = "1";
  canvas.dataset.peak = `${at[0]},${at[1]}`;
}

function setBusy(busy) {
  state.busy = busy;
  updateAsk();
}

function wire() {
  $("key-button").addEventListener("click", askKey);
  $("key-form").addEventListener("submit", () => {
    state.key = $("key-input").value.trim();
    if (state.key) sessionStorage.setItem(KEY_SLOT, state.key);
    else sessionStorage.removeItem(KEY_SLOT);
    connect();
  });
  $("file-input").addEventListener("change", (e) => {
    if (e.target.files.length) openFile(e.target.files[0]);
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) openFile(e.dataTransfer.files[0]);
  });
  $("ask-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const question = $("question").value.trim();
    if (!question || state.busy || !state.doc) return;
    clearError();
    setBusy(true);
    $("question").value = "";
    try {
      await ask(question);
    } finally {
      setBusy(false);
    }
  });
  $("question").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      $("ask-form").requestSubmit();
    }
  });
  connect();
}

document.addEventListener("DOMContentLoaded", wire);
