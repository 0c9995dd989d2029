// qvlm page: pick or drop an image, get its caption, ask questions; answers stream from the same
// OpenAI-compatible endpoint other clients use (POST /v1/chat/completions with stream: true).
// Below the image, heat maps of where each Q-Former query looks and, for a stage-2 model, which queries
// each word of its caption drew on (POST /v1/attention with words: true).
"use strict";

const $ = (id) => document.getElementById(id);
const MAX_SIDE = 1024; // larger photos are shrunk here: the model sees a small image anyway
let imageUrl = null;   // the current image as a data: URL
let modelId = null;
let modelStage = null;
let busy = false;
let maxImageBytes = 10 * 1024 * 1024;
const MAP_SIDE = 96; // pixels per attention map drawn
// Heat-map colours from little attention to the most (inferno-like, as `qvlm report` draws them).
const HEAT = [[0, 0, 4], [120, 28, 109], [237, 105, 37], [252, 255, 164]];

function apiKey() { return $("api-key").value.trim(); }

function jsonHeaders() {
  const headers = { "Content-Type": "application/json" };
  if (apiKey()) headers.Authorization = `Bearer ${apiKey()}`;
  return headers;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function setBusy(on, what) {
  busy = on;
  $("status").textContent = on ? `working… (${what})` : "";
  $("question").disabled = on || !imageUrl;
  $("send").disabled = on || !imageUrl;
}

async function loadHealth() {
  try {
    const res = await fetch("/health");
    const info = await res.json();
    modelId = info.model;
    modelStage = info.stage;
    maxImageBytes = info.max_image_bytes || maxImageBytes;
    $("model").textContent = `model: ${info.model}` + (info.stage === 2 ? "" : " (stage 1: cannot answer)");
    $("key-row").hidden = !info.auth_required;
    $("api-key").value = sessionStorage.getItem("qvlm-api-key") || "";
  } catch (e) {
    $("model").textContent = "server unreachable";
    showError(`Cannot reach the server: ${e.message}`);
  }
}

function readAsDataURL(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error("could not read the file"));
    reader.readAsDataURL(blob);
  });
}

function loadImage(url) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("this file is not an image the browser can decode"));
    img.src = url;
  });
}

// A data: URL of the file, shrunk (as JPEG) when it is large in pixels or bytes.
async function prepareImage(file) {
  if (!file.type.startsWith("image/")) throw new Error(`"${file.name}" is not an image`);
  const url = await readAsDataURL(file);
  const img = await loadImage(url);
  const scale = Math.min(1, MAX_SIDE / Math.max(img.naturalWidth, img.naturalHeight));
  if (scale === 1 && file.size < maxImageBytes * 0.9) return url;
  const canvas = document.createElement("canvas");
  canvas.width = Math.max(1, Math.round(img.naturalWidth * scale));
  canvas.height = Math.max(1, Math.round(img.naturalHeight * scale));
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#fff"; // transparent areas become white, as the server would do
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
  return canvas.toDataURL("image/jpeg", 0.92);
}

async function errorMessage(res) {
  try {
    const body = await res.json();
    if (body.error && body.error.message) return `${body.error.message} (HTTP ${res.status})`;
  } catch (e) { /* not JSON: fall through */ }
  return `HTTP ${res.status} ${res.statusText}`;
}

// Stream an answer into `onText`; resolves when the server sends [DONE].
async function streamChat(text, onText) {
  const content = [{ type: "image_url", image_url: { url: imageUrl } }];
  if (text) content.push({ type: "text", text });
  const res = await fetch("/v1/chat/completions", {
    method: "POST", headers: jsonHeaders(),
    body: JSON.stringify({ model: modelId, stream: true, messages: [{ role: "user", content }] }),
  });
  if (!res.ok) throw new Error(await errorMessage(res));
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) { // SSE events end with a blank line
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) onText(delta.content);
      }
    }
  }
  throw new Error("the stream ended early");
}

async function caption() {
  const el = $("caption");
  el.textContent = "";
  el.dataset.state = "working";
  setBusy(true, "captioning");
  try {
    await streamChat("", (t) => { el.textContent += t; });
    el.dataset.state = "done";
    if (!el.textContent) el.textContent = "(the model returned an empty caption)";
  } catch (e) {
    el.dataset.state = "error";
    showError(e.message);
  } finally {
    setBusy(false);
  }
}

async function ask(question) {
  const turn = document.createElement("div");
  turn.className = "turn";
  const q = document.createElement("div");
  q.className = "q";
  q.textContent = question;
  const a = document.createElement("div");
  a.className = "a working";
  turn.append(q, a);
  $("log").append(turn);
  setBusy(true, "answering");
  try {
    await streamChat(question, (t) => { a.textContent += t; });
    if (!a.textContent) a.textContent = "(empty answer)";
  } catch (e) {
    a.textContent = "(failed)";
    showError(e.message);
  } finally {
    a.classList.remove("working");
    setBusy(false);
  }
}

// v in [0, 1] -> [r, g, b] along HEAT
function heatColour(v) {
  const x = v * (HEAT.length - 1);
  const i = Math.min(Math.floor(x), HEAT.length - 2);
  return HEAT[i].map((c, k) => c + (HEAT[i + 1][k] - c) * (x - i));
}

// A grid×grid canvas, one pixel per patch; each map is scaled to its own maximum, as in `qvlm report`.
function heatCanvas(values, grid) {
  const top = Math.max(...values, 1e-12);
  const heat = document.createElement("canvas");
  heat.width = heat.height = grid;
  const ctx = heat.getContext("2d");
  const pixels = ctx.createImageData(grid, grid);
  values.forEach((v, i) => pixels.data.set([...heatColour(v / top), 255], 4 * i)); // raster order
  ctx.putImageData(pixels, 0, 0);
  return heat;
}

function drawMap(img, values, grid, label) {
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = MAP_SIDE;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0, MAP_SIDE, MAP_SIDE); // square, as the encoder sees it
  ctx.globalAlpha = 0.6;
  ctx.imageSmoothingEnabled = false; // one flat cell per patch
  ctx.drawImage(heatCanvas(values, grid), 0, 0, MAP_SIDE, MAP_SIDE);
  const figure = document.createElement("figure");
  const caption = document.createElement("figcaption");
  caption.textContent = label;
  figure.append(canvas, caption);
  return figure;
}

// One table row per generated word: a cell per query, shaded by the share of the word's image attention
// on it (each row sums to 1), then the share of all its attention that went to the image.
function wordRows(words, numQueries) {
  const cell = (tag, text) => Object.assign(document.createElement(tag), { textContent: text });
  const head = document.createElement("tr");
  head.append(cell("th", "word"), ...Array.from({ length: numQueries }, (_, q) => cell("th", `q${q}`)),
              cell("th", "on image"));
  const rows = words.tokens.map((token, t) => {
    const row = document.createElement("tr");
    const shares = words.queries[t].map((v) => {
      const td = cell("td", "");
      td.style.background = `rgb(${heatColour(v).join(",")})`;
      td.title = `${(100 * v).toFixed(1)}%`;
      return td;
    });
    row.append(cell("th", token), ...shares, cell("td", `${(100 * words.image_share[t]).toFixed(0)}%`));
    return row;
  });
  return [head, ...rows];
}

async function showAttention() {
  const url = imageUrl;
  $("attention").hidden = true;
  try {
    const res = await fetch("/v1/attention", {
      method: "POST", headers: jsonHeaders(), body: JSON.stringify({ image: url, words: modelStage === 2 }),
    });
    if (!res.ok) throw new Error(await errorMessage(res));
    const body = await res.json();
    const img = await loadImage(url);
    if (url !== imageUrl) return; // another image was picked meanwhile
    const maps = body.maps.map((values, q) => drawMap(img, values, body.grid, `query ${q}`));
    $("attention-maps").replaceChildren(drawMap(img, body.mean, body.grid, "mean"), ...maps);
    $("word-attention").hidden = !body.words;
    if (body.words) $("word-table").replaceChildren(...wordRows(body.words, body.num_queries));
    $("attention").hidden = false;
  } catch (e) {
    if (url === imageUrl) showError(`Attention maps: ${e.message}`);
  }
}

async function useFile(file) {
  if (!file || busy) return;
  showError("");
  try {
    imageUrl = await prepareImage(file);
  } catch (e) {
    showError(e.message);
    return;
  }
  $("preview").src = imageUrl;
  $("preview").hidden = false;
  $("drop-hint").hidden = true;
  $("log").replaceChildren();
  showAttention(); // queued before the caption on the server's one model worker, and quick
  await caption();
}

function wire() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => useFile(e.target.files[0]));
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("file").click(); });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    useFile(e.dataTransfer.files[0]);
  });
  $("ask").addEventListener("submit", (e) => {
    e.preventDefault();
    const question = $("question").value.trim();
    if (!question || busy || !imageUrl) return;
    $("question").value = "";
    showError("");
    ask(question);
  });
  $("api-key").addEventListener("change", () => sessionStorage.setItem("qvlm-api-key", apiKey()));
}

wire();
loadHealth();
