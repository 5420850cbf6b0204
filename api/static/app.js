// The service's web page: plain JavaScript, no build step, no outside request. It talks to the service only
// through its public API (GET models, POST detect), as any client would.
"use strict";

// One colour per class id (1-based): the same list as detect/drawing.py's PALETTE (a test holds them equal).
const PALETTE = [
  [255, 56, 56], [31, 119, 255], [44, 200, 64], [255, 157, 0], [170, 60, 255],
  [0, 200, 200], [255, 55, 200], [140, 200, 0], [255, 210, 0], [0, 90, 160],
  [200, 100, 40], [0, 160, 110], [230, 120, 160], [100, 100, 255], [160, 0, 60],
  [120, 180, 255], [90, 60, 0], [255, 120, 90], [0, 110, 40], [130, 130, 130],
];
const MAX_CANVAS_SIDE = 1600;   // big photos are drawn scaled down: the page never holds a 100-megapixel canvas
const REQUEST_TIMEOUT_MS = 120000;
const PARALLEL_REQUESTS = 2;

// What an error means, in words, by HTTP status; the service's own message is shown after it.
const STATUS_WORDS = {
  0: "The service could not be reached (is it running, and is this page served by it?).",
  400: "The service could not read the request.",
  401: "The service needs an API key: enter it in the API key field.",
  403: "The API key was refused.",
  404: "The service does not know this model.",
  405: "The service does not accept this kind of request here.",
  408: "The upload took too long.",
  413: "Too large: the image or upload is bigger than the service accepts.",
  415: "Not an image the service can read (JPEG, PNG, GIF, BMP, WebP or TIFF).",
  422: "The service could not use this input.",
  429: "Too many requests: wait a moment and try again.",
  500: "The service failed on this input.",
  503: "The service is busy or still loading its models: try again in a moment.",
  504: "The service did not answer in time.",
};

function colourOf(classId) {
  const [r, g, b] = PALETTE[(classId - 1) % PALETTE.length];
  return `rgb(${r}, ${g}, ${b})`;
}

function textColourOf(classId) {
  const [r, g, b] = PALETTE[(classId - 1) % PALETTE.length];
  return 0.299 * r + 0.587 * g + 0.114 * b > 128 ? "#000" : "#fff";
}

// "Words for the status. code: message" for an HTTP status and the service's error body (or none).
function describeError(status, body) {
  const words = STATUS_WORDS[status] ||
    (status >= 500 ? STATUS_WORDS[500] : status >= 400 ? STATUS_WORDS[400] : `Unexpected answer (HTTP ${status}).`);
  const error = body && body.error;
  if (error && error.code) return `${words} ${error.code}: ${error.message}`;
  return status ? `${words} (HTTP ${status})` : words;
}

const $ = (id) => document.getElementById(id);
const state = { models: [], responses: {}, running: false };

function headers() {
  const key = $("api-key").value;
  return key ? { "X-API-Key": key } : {};
}

async function call(path, options) {
  // {status, body}: status 0 when the service cannot be reached or does not answer in time.
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), REQUEST_TIMEOUT_MS);
  try {
    const response = await fetch(path, { ...options, signal: controller.signal });
    let body = null;
    try { body = await response.json(); } catch (_) { body = null; }
    return { status: response.status, body };
  } catch (err) {
    return { status: err.name === "AbortError" ? 504 : 0, body: null };
  } finally {
    clearTimeout(timer);
  }
}

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

async function loadModels() {
  const { status, body } = await call("models", { headers: headers() });
  if (status !== 200) {
    showError(describeError(status, body));
    $("model").innerHTML = "<option>no models</option>";
    return;
  }
  showError("");
  state.models = body.models;
  const select = $("model");
  select.innerHTML = "";
  for (const model of body.models) {
    const option = document.createElement("option");
    option.value = model.name;
    option.textContent = `${model.name} (${model.detector}, ${model.class_names.length} classes, ${model.device})`;
    option.selected = model.name === body.default;
    select.append(option);
  }
  select.disabled = body.models.length === 0;
  showClasses();
  updateButtons();
}

function currentModel() {
  return state.models.find((m) => m.name === $("model").value);
}

function showClasses() {
  const box = $("classes");
  box.querySelectorAll("label").forEach((label) => label.remove());
  const model = currentModel();
  if (!model) return;
  model.class_names.forEach((name, i) => {
    const label = document.createElement("label");
    label.className = "class";
    const input = document.createElement("input");
    input.type = "checkbox";
    input.value = name;
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = colourOf(i + 1);
    label.append(input, swatch, document.createTextNode(name));
    box.append(label);
  });
}

function updateButtons() {
  $("run").disabled = state.running || !currentModel() || $("files").files.length === 0;
  $("download").disabled = Object.keys(state.responses).length === 0;
}

function resultCard(file) {
  const card = $("result-template").content.firstElementChild.cloneNode(true);
  card.querySelector(".name").textContent = file.name;
  card.dataset.file = file.name;
  card.dataset.state = "waiting";
  $("results").append(card);
  return card;
}

async function detectOne(file, card) {
  const form = new FormData();
  form.append("images", file, file.name);
  form.append("model", $("model").value);
  form.append("score_threshold", $("threshold").value);
  const ticked = [...$("classes").querySelectorAll("input:checked")].map((input) => input.value);
  if (ticked.length) form.append("classes", ticked.join(","));
  const { status, body } = await call("detect", { method: "POST", body: form, headers: headers() });
  if (status !== 200) return fail(card, describeError(status, body));
  state.responses[file.name] = body;
  const item = body.images[0];
  if (item.error) return fail(card, describeError(422, { error: item.error }));
  await draw(card, file, item);
  card.dataset.state = "done";
}

function fail(card, message) {
  const error = card.querySelector(".error");
  error.textContent = message;
  error.hidden = false;
  card.querySelector(".picture").remove();
  card.dataset.state = "error";
}

async function draw(card, file, item) {
  let bitmap;
  try {
    bitmap = await createImageBitmap(file);  // decoded off the main thread
  } catch (_) {
    bitmap = null;  // a format the browser cannot show (e.g. TIFF): the boxes on a blank canvas of the image's size
  }
  const scale = Math.min(1, MAX_CANVAS_SIDE / Math.max(item.width, item.height));
  const canvas = card.querySelector("canvas");
  canvas.width = Math.max(1, Math.round(item.width * scale));
  canvas.height = Math.max(1, Math.round(item.height * scale));
  canvas.dataset.scale = String(scale);
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#ddd";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  if (bitmap) {
    ctx.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
    bitmap.close();
  }
  const lineWidth = Math.max(2, Math.round(0.0015 * (canvas.width + canvas.height)));
  const font = Math.max(12, 5 * lineWidth + 4);
  ctx.font = `${font}px sans-serif`;
  ctx.textBaseline = "top";
  const counts = new Map();
  for (const d of [...item.detections].reverse()) {  // best last, on top
    const [x1, y1, x2, y2] = d.box.map((v) => v * scale);
    ctx.strokeStyle = colourOf(d.class_id);
    ctx.lineWidth = lineWidth;
    ctx.strokeRect(x1 + lineWidth / 2, y1 + lineWidth / 2, Math.max(0, x2 - x1 - lineWidth), Math.max(0, y2 - y1 - lineWidth));
    const text = `${d.class_name} ${d.score.toFixed(2)}`;
    const tw = ctx.measureText(text).width + 2 * lineWidth;
    const th = font + 2 * lineWidth;
    const tx = Math.max(0, Math.min(x1, canvas.width - tw));
    const ty = Math.max(0, Math.min(y1 - th >= 0 ? y1 - th : y1, canvas.height - th));
    ctx.fillStyle = colourOf(d.class_id);
    ctx.fillRect(tx, ty, tw, th);
    ctx.fillStyle = textColourOf(d.class_id);
    ctx.fillText(text, tx + lineWidth, ty + lineWidth);
    counts.set(d.class_id, { name: d.class_name, n: (counts.get(d.class_id)?.n || 0) + 1 });
  }
  const legend = card.querySelector(".legend");
  if (counts.size === 0) legend.innerHTML = "<li>nothing found above the threshold</li>";
  for (const [classId, { name, n }] of counts) {
    const li = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = colourOf(classId);
    li.append(swatch, document.createTextNode(`${name}: ${n}`));
    legend.append(li);
  }
  const t = item.timings_ms || {};
  const parts = Object.entries(t).map(([stage, ms]) => `${stage} ${ms.toFixed(1)} ms`);
  card.querySelector(".timings").textContent =
    `${item.width} × ${item.height} px; ${parts.join(", ")}` + (item.batch_size ? `; batch of ${item.batch_size}` : "");
}

async function run(event) {
  event.preventDefault();
  if (state.running) return;
  const files = [...$("files").files];
  if (!files.length) return;
  state.running = true;
  state.responses = {};
  showError("");
  $("results").innerHTML = "";
  updateButtons();
  const queue = files.map((file) => [file, resultCard(file)]);
  let done = 0;
  $("status").textContent = `detecting in ${files.length} image(s)…`;
  const worker = async () => {
    while (queue.length) {
      const [file, card] = queue.shift();
      try {
        await detectOne(file, card);
      } catch (err) {
        fail(card, `The page could not show this result: ${err}`);
      }
      done += 1;
      $("status").textContent = `${done} of ${files.length} done`;
    }
  };
  await Promise.all(Array.from({ length: PARALLEL_REQUESTS }, worker));
  state.running = false;
  updateButtons();
}

function download() {
  const blob = new Blob([JSON.stringify(state.responses, null, 2)], { type: "application/json" });
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = "detections.json";
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

function setUp() {
  $("controls").addEventListener("submit", run);
  $("download").addEventListener("click", download);
  $("model").addEventListener("change", showClasses);
  $("files").addEventListener("change", updateButtons);
  $("threshold").addEventListener("input", () => { $("threshold-value").value = Number($("threshold").value).toFixed(2); });
  $("api-key").addEventListener("change", loadModels);
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    $("files").files = e.dataTransfer.files;
    updateButtons();
  });
  loadModels();
}

window.detectPage = { PALETTE, describeError, state };
document.addEventListener("DOMContentLoaded", setUp);
