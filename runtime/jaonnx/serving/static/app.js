// The jaonnx playground: plain JS against the public HTTP API. No framework, no build step.
"use strict";
const $ = (id) => document.getElementById(id);
let models = [];
let controller = null;

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function status(text, isError) {
  $("status").textContent = text || "";
  $("status").className = isError ? "error" : "";
}

async function failure(response) {
  try { return (await response.json()).error.message; } catch (e) { return "HTTP " + response.status; }
}

async function loadModels() {
  status("loading models…");
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) { models = []; render(); status(await failure(response), true); return; }
  models = (await response.json()).data;
  const select = $("model"), before = select.value;
  select.innerHTML = "";
  for (const m of models) select.add(new Option(`${m.id}  (${m.task})`, m.id));
  if (models.some((m) => m.id === before)) select.value = before;
  render();
  status(models.length + " models");
}

function render() {
  const m = models.find((x) => x.id === $("model").value);
  $("task").textContent = m ? m.task : "";
  $("fill-mask").hidden = !m || m.task !== "fill-mask";
  $("generate").hidden = !m || m.task !== "text-generation";
  if (m && m.task === "fill-mask") {
    $("mask-token").textContent = m.mask_token;
    if (!$("fm-text").value) $("fm-text").value = `東京は日本の${m.mask_token}です。`;
  }
}

async function fillMask(event) {
  event.preventDefault();
  const body = { model: $("model").value, inputs: $("fm-text").value, top_k: Number($("fm-top-k").value) };
  status("filling…");
  const response = await fetch("/v1/fill-mask", { method: "POST", headers: headers(), body: JSON.stringify(body) });
  if (!response.ok) { status(await failure(response), true); return; }
  let results = (await response.json()).results;
  if (results.length && Array.isArray(results[0])) results = results.flat(); // several masks
  const tbody = $("fm-results").querySelector("tbody");
  tbody.innerHTML = "";
  results.forEach((r, i) => {
    const row = tbody.insertRow();
    row.className = "prediction";
    row.insertCell().textContent = i + 1;
    row.insertCell().textContent = r.token_str;
    row.insertCell().textContent = r.score.toFixed(4);
    const bar = row.insertCell(); bar.className = "bar";
    const fill = document.createElement("div"); fill.style.width = Math.round(r.score * 100) + "%"; bar.append(fill);
  });
  status("");
}

async function generate(event) {
  event.preventDefault();
  const out = $("gen-output");
  const body = {
    model: $("model").value, prompt: $("gen-prompt").value, stream: true,
    max_tokens: Number($("gen-max").value), temperature: Number($("gen-temp").value), top_p: Number($("gen-top-p").value),
  };
  out.querySelector(".prompt").textContent = body.prompt;
  out.querySelector(".completion").textContent = "";
  out.dataset.chunks = "0"; out.dataset.done = "false";
  controller = new AbortController();
  $("gen-run").disabled = true; $("gen-stop").disabled = false;
  status("generating…");
  try {
    const response = await fetch("/v1/completions", { method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal });
    if (!response.ok) { status(await failure(response), true); return; }
    const reader = response.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") { out.dataset.done = "true"; continue; }
        const event = JSON.parse(data);
        if (event.error) { status(event.error.message, true); continue; }
        for (const choice of event.choices) {
          if (choice.text) {
            out.querySelector(".completion").textContent += choice.text;
            out.dataset.chunks = String(Number(out.dataset.chunks) + 1);
          }
        }
      }
    }
    status($("gen-output").dataset.done === "true" ? "done" : "stream ended early");
  } catch (e) {
    status(e.name === "AbortError" ? "stopped" : String(e), e.name !== "AbortError");
  } finally {
    $("gen-run").disabled = false; $("gen-stop").disabled = true; controller = null;
  }
}

$("api-key").value = localStorage.getItem("jaonnx-api-key") || "";
$("api-key").addEventListener("change", () => { localStorage.setItem("jaonnx-api-key", $("api-key").value.trim()); loadModels(); });
$("model").addEventListener("change", render);
$("reload").addEventListener("click", loadModels);
$("fill-mask").addEventListener("submit", fillMask);
$("generate").addEventListener("submit", generate);
$("gen-stop").addEventListener("click", () => controller && controller.abort());
loadModels();
