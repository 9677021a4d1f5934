// llava-mole routing page: ask about an image, stream the answer, colour every token by the
// expert it went to in the chosen MoLE layer. Plain JS, no build step, no external resources.
//
// URL parameters (handy for links and for headless tests): q=question, sample=1 (use the
// sample image), auto=1 (ask at once), layer=N, prompt=1 (show prompt tokens), key=API key,
// max_tokens=N.
"use strict";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const state = {
  image: null, // data URL
  model: null,
  layers: [],
  numExperts: 0,
  answer: [], // {text, experts}
  prompt: [], // {text, kind, experts}
  chunks: 0, // stream chunks received for the latest answer
};
window.llavaMole = state; // for debugging (and the browser test)

function colour(expert) {
  if (expert < 8) return `var(--e${expert})`;
  return `hsl(${(expert * 137.5) % 360} 60% 55%)`;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function setStatus(text, kind) {
  $("status").textContent = text;
  if (kind) document.body.dataset.state = kind;
}

function layer() {
  return Number($("layer").value || 0);
}

// ---- image input ---------------------------------------------------------------------------

function useImage(dataUrl) {
  state.image = dataUrl;
  $("preview").src = dataUrl;
  $("preview").hidden = false;
}

function readFile(file) {
  if (!file || !file.type.startsWith("image/")) {
    setStatus("that is not an image file", "error");
    return;
  }
  const reader = new FileReader();
  reader.onload = () => useImage(reader.result);
  reader.readAsDataURL(file);
}

function sampleImage() {
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = 64;
  const g = canvas.getContext("2d");
  g.fillStyle = "#f4f1e8";
  g.fillRect(0, 0, 64, 64);
  g.fillStyle = "#d33";
  g.beginPath();
  g.arc(22, 24, 13, 0, 2 * Math.PI);
  g.fill();
  g.fillStyle = "#36c";
  g.fillRect(34, 34, 22, 22);
  return canvas.toDataURL("image/png");
}

// ---- rendering -----------------------------------------------------------------------------

function tokenSpan(token) {
  const span = document.createElement("span");
  const expert = token.experts ? token.experts[layer()] : undefined;
  span.className = "tok" + (token.kind === "image" ? " image" : "");
  if (expert !== undefined) {
    span.classList.add(`expert-${expert}`);
    span.dataset.expert = String(expert);
    if (expert >= 8) span.style.background = colour(expert);
    span.title = token.experts.map((e, l) => `layer ${state.layers[l]}: expert ${e}`).join("\n");
  }
  span.textContent = token.kind === "image" ? "" : token.text;
  return span;
}

function renderTokens(element, tokens) {
  element.replaceChildren(...tokens.map(tokenSpan));
}

function renderPrompt() {
  const show = $("show-prompt").checked && state.prompt.length > 0;
  $("prompt").hidden = !show;
  if (!show) return;
  const images = state.prompt.filter((t) => t.kind === "image");
  const grid = $("image-grid");
  const side = Math.max(1, Math.round(Math.sqrt(images.length)));
  grid.style.gridTemplateColumns = `repeat(${side}, 1fr)`;
  grid.hidden = images.length === 0;
  if (state.image) grid.style.background = `url(${state.image}) center / cover`;
  grid.replaceChildren(
    ...images.map((t) => {
      const cell = document.createElement("div");
      const expert = t.experts[layer()];
      cell.className = "cell";
      cell.dataset.expert = String(expert);
      cell.style.background = colour(expert);
      cell.style.opacity = "0.75";
      return cell;
    }),
  );
  renderTokens($("prompt-tokens"), state.prompt.filter((t) => t.kind !== "image"));
}

function renderChart() {
  const routed = state.answer.filter((t) => t.experts);
  const rows = state.layers.map((name, l) => {
    const counts = new Array(state.numExperts).fill(0);
    routed.forEach((t) => counts[t.experts[l]]++);
    const row = document.createElement("div");
    row.className = "row" + (l === layer() ? " chosen" : "");
    row.dataset.layer = String(name);
    const label = document.createElement("span");
    label.className = "name";
    label.textContent = `layer ${name}`;
    const bar = document.createElement("div");
    bar.className = "bar";
    counts.forEach((count, e) => {
      if (!count) return;
      const seg = document.createElement("div");
      const share = count / routed.length;
      seg.className = "seg";
      seg.dataset.expert = String(e);
      seg.style.width = `${(100 * share).toFixed(1)}%`;
      seg.style.background = colour(e);
      seg.title = `expert ${e}: ${(100 * share).toFixed(0)}% of ${routed.length} tokens`;
      bar.append(seg);
    });
    row.append(label, bar);
    return row;
  });
  $("chart").replaceChildren(...rows);
}

function renderLegend() {
  const items = [];
  for (let e = 0; e < state.numExperts; e++) {
    const item = document.createElement("span");
    item.textContent = `expert ${e}`;
    item.style.background = colour(e);
    item.style.color = "#fff";
    items.push(item);
  }
  $("legend").replaceChildren(...items);
}

function setLayers(layers, numExperts) {
  state.layers = layers;
  state.numExperts = numExperts;
  const select = $("layer");
  const wanted = params.get("layer") ?? select.value;
  select.replaceChildren(
    ...layers.map((name, l) => new Option(`${name}`, String(l), false, String(l) === wanted)),
  );
  renderLegend();
}

function renderAll() {
  renderTokens($("answer"), state.answer);
  renderPrompt();
  renderChart();
}

// ---- asking --------------------------------------------------------------------------------

function handleChunk(chunk) {
  if (chunk.error) throw new Error(chunk.error.message);
  state.chunks++;
  const choice = chunk.choices && chunk.choices[0];
  if (!choice) return;
  const routing = choice.routing;
  if (routing && routing.layers) setLayers(routing.layers, routing.num_experts);
  if (routing && routing.prompt) state.prompt = routing.prompt;
  for (const token of (routing && routing.tokens) || []) {
    state.answer.push(token);
    $("answer").append(tokenSpan(token));
  }
  if (!routing && choice.delta && choice.delta.content) {
    state.answer.push({ text: choice.delta.content, experts: null });
    $("answer").append(tokenSpan({ text: choice.delta.content, experts: null }));
  }
  if (choice.finish_reason) state.finish = choice.finish_reason;
}

async function readStream(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        handleChunk(JSON.parse(data));
      }
    }
  }
}

async function ask(event) {
  if (event) event.preventDefault();
  const question = $("question").value.trim();
  if (!question) return;
  const content = [];
  if (state.image) content.push({ type: "image_url", image_url: { url: state.image } });
  content.push({ type: "text", text: question });
  state.answer = [];
  state.prompt = [];
  state.chunks = 0;
  state.finish = null;
  renderAll();
  setStatus("thinking…", "running");
  $("go").disabled = true;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify({
        model: state.model,
        messages: [{ role: "user", content }],
        max_tokens: Number($("max-tokens").value) || 32,
        temperature: 0,
        stream: true,
        return_routing: state.numExperts !== 0,
        return_prompt_routing: state.numExperts !== 0,
      }),
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error((body.error && body.error.message) || `HTTP ${response.status}`);
    }
    await readStream(response);
    renderAll();
    setStatus(`${state.answer.length} tokens (${state.finish || "done"})`, "done");
  } catch (err) {
    setStatus(`error: ${err.message}`, "error");
  } finally {
    $("go").disabled = false;
  }
}

async function connect() {
  const response = await fetch("/v1/models", { headers: headers() });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error ? body.error.message : `HTTP ${response.status}`);
  const card = body.data[0];
  state.model = card.id;
  state.numExperts = card.num_experts || 0;
  const layers = Array.from({ length: card.mole_layers || 0 }, (_, l) => l);
  setLayers(layers, state.numExperts);
  $("model").textContent = `${card.id}: ${card.mole_layers} MoLE layers, ${card.num_experts} experts`;
}

// ---- wiring --------------------------------------------------------------------------------

function wire() {
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    readFile(e.dataTransfer.files[0]);
  });
  $("file").addEventListener("change", (e) => readFile(e.target.files[0]));
  $("sample").addEventListener("click", () => useImage(sampleImage()));
  $("ask").addEventListener("submit", ask);
  $("layer").addEventListener("change", renderAll);
  $("show-prompt").addEventListener("change", renderPrompt);
  $("key").value = params.get("key") || localStorage.getItem("llava-mole-key") || "";
  $("key").addEventListener("change", () => {
    localStorage.setItem("llava-mole-key", $("key").value);
    connected(); // try again with the new key
  });
  if (params.get("q")) $("question").value = params.get("q");
  if (params.get("max_tokens")) $("max-tokens").value = params.get("max_tokens");
  if (params.get("prompt") === "1") $("show-prompt").checked = true;
  if (params.get("sample") === "1") useImage(sampleImage());
}

async function connected() {
  try {
    await connect();
  } catch (err) {
    setStatus(`cannot reach the server: ${err.message} (API key: see settings)`, "error");
    return false;
  }
  setStatus("ready", "idle");
  return true;
}

async function main() {
  wire();
  if ((await connected()) && params.get("auto") === "1") await ask();
}

main();
