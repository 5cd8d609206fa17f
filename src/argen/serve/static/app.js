// The argen page: plain DOM, no build step. Every string from the server or the user reaches the page through
// textContent or an attribute set by the DOM API, never through innerHTML, so it is always escaped.
"use strict";

const $ = (id) => document.getElementById(id);
let models = {};

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value;
  if (key) h["X-API-Key"] = key;
  return h;
}

function showError(text) {
  $("error").textContent = text;
}

function image(b64, alt) {
  const img = document.createElement("img");
  img.src = "data:image/png;base64," + b64;
  img.alt = alt;
  return img;
}

function fillClasses() {
  const info = models[$("model").value];
  const box = $("classes");
  box.replaceChildren();
  info.classes.forEach((name, i) => {
    const label = document.createElement("label");
    const check = document.createElement("input");
    check.type = "checkbox";
    check.value = String(i);
    check.checked = i < 4;
    label.append(check, " " + name);
    box.append(label);
  });
  $("order").textContent = "order: " + info.order;
  $("cfg_scale").value = info.defaults.cfg_scale;
}

async function loadModels() {
  const response = await fetch("/v1/models", { headers: headers() });
  const body = await response.json();
  if (!response.ok) {
    showError(body.error || response.statusText);
    return;
  }
  models = body.models;
  const select = $("model");
  select.replaceChildren();
  for (const name of Object.keys(models)) {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = name;
    select.append(option);
  }
  $("n").max = body.max_images;
  fillClasses();
}

function number(id) {
  const text = $(id).value.trim();
  return text === "" ? undefined : Number(text);
}

function showResult(data) {
  $("grid").replaceChildren(image(data.grid, "grid of " + data.images.length + " images"));
  const links = $("downloads");
  links.replaceChildren();
  data.images.forEach((b64, i) => {
    const a = document.createElement("a");
    a.href = "data:image/png;base64," + b64;
    a.download = "argen-" + data.model + "-seed" + data.seed + "-" + i + ".png";
    a.textContent = "image " + (i + 1);
    links.append(a);
  });
  $("status").textContent = data.images.length + " image(s), " + data.width + "x" + data.height + ", seed " + data.seed;
}

async function generate(event) {
  event.preventDefault();
  showError("");
  const labels = [...$("classes").querySelectorAll("input:checked")].map((c) => Number(c.value));
  const body = {
    model: $("model").value,
    labels: labels,
    n: number("n"),
    seed: number("seed"),
    cfg_scale: number("cfg_scale"),
    temperature: number("temperature"),
  };
  $("generate").disabled = true;
  $("status").textContent = "queued";
  $("preview").replaceChildren();
  $("step").textContent = "";
  try {
    const response = await fetch("/v1/images?stream=true", {
      method: "POST", headers: headers(), body: JSON.stringify(body),
    });
    if (!response.ok) {
      const problem = await response.json().catch(() => ({ error: response.statusText }));
      showError((problem.field ? problem.field + ": " : "") + problem.error);
      $("status").textContent = "";
      return;
    }
    await readEvents(response);
  } catch (error) {
    showError(String(error));
  } finally {
    $("generate").disabled = false;
  }
}

async function readEvents(response) {
  // server-sent events over a POST: split the stream into "event: X\ndata: {...}" blocks
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const kind = (block.match(/^event: (.*)$/m) || [])[1];
      const data = JSON.parse((block.match(/^data: (.*)$/m) || [])[1] || "{}");
      if (kind === "preview") {
        $("preview").replaceChildren(image(data.grid, "preview"));
        $("step").textContent = "step " + data.step + " of " + data.num_steps;
        $("status").textContent = "generating";
      } else if (kind === "done") {
        showResult(data);
      } else if (kind === "error") {
        showError(data.error);
      }
    }
  }
}

$("model").addEventListener("change", fillClasses);
$("form").addEventListener("submit", generate);
loadModels().catch((error) => showError(String(error)));
