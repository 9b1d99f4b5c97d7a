"""GET /: one self-contained page (no external scripts, fonts or styles) that asks the API a
question and shows the answers, the comparison with the baselines and the teacher, and the
cube's activity as one heat map per depth layer, drawn on canvas from POST /v1/trace."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>cellular cube</title>
<style>
  body { font: 15px/1.45 system-ui, sans-serif; margin: 0; background: #f6f7f9; color: #1d2330; }
  header { background: #1d2330; color: #fff; padding: 14px 24px; }
  header h1 { margin: 0; font-size: 20px; }
  header p { margin: 4px 0 0; color: #b8c0d0; font-size: 13px; }
  main { max-width: 1100px; margin: 0 auto; padding: 18px 24px 40px; }
  form { display: flex; gap: 8px; margin-bottom: 14px; }
  #question { flex: 1; font: inherit; padding: 9px 11px; border: 1px solid #b9c0cc; border-radius: 6px; }
  button, select { font: inherit; padding: 8px 14px; border-radius: 6px; border: 1px solid #3b5bdb; }
  button { background: #3b5bdb; color: #fff; cursor: pointer; }
  button:disabled { background: #8a9bd8; border-color: #8a9bd8; cursor: wait; }
  section { background: #fff; border: 1px solid #dde1e8; border-radius: 8px; padding: 12px 16px; margin-bottom: 14px; }
  h2 { font-size: 15px; margin: 0 0 8px; }
  ol { margin: 0; padding-left: 22px; }
  li { margin: 6px 0; }
  .score { display: inline-block; min-width: 52px; font-variant-numeric: tabular-nums; color: #3b5bdb; font-weight: 600; }
  .muted { color: #6b7385; font-size: 13px; }
  .cols { display: grid; grid-template-columns: repeat(3, 1fr); gap: 12px; }
  .col { border: 1px solid #e5e8ee; border-radius: 6px; padding: 8px 10px; }
  .col h3 { margin: 0 0 4px; font-size: 13px; text-transform: uppercase; letter-spacing: .04em; color: #4a5268; }
  #layers { display: flex; flex-wrap: wrap; gap: 12px; }
  figure { margin: 0; text-align: center; }
  figcaption { font-size: 12px; color: #4a5268; margin-top: 3px; }
  canvas { image-rendering: pixelated; border: 1px solid #cfd4dc; }
  #error { color: #b42318; font-weight: 600; }
  .legend { display: flex; align-items: center; gap: 6px; font-size: 12px; color: #4a5268; margin-top: 8px; }
</style>
</head>
<body>
<header>
  <h1>cellular cube</h1>
  <p id="model">loading the model&hellip;</p>
</header>
<main>
  <form id="ask-form">
    <input id="question" name="question" autocomplete="off" placeholder="Ask a question, e.g. Why is the sky blue?" required>
    <select id="top-k" title="answers to show"><option>1</option><option>3</option><option selected>5</option><option>10</option></select>
    <button id="ask" type="submit">Ask</button>
  </form>
  <p id="error" role="alert"></p>
  <section id="answers-section" hidden>
    <h2>Answers</h2>
    <ol id="answers"></ol>
    <p class="muted" id="timings"></p>
  </section>
  <section id="compare-section" hidden>
    <h2>Compare</h2>
    <div class="cols" id="compare"></div>
  </section>
  <section id="trace-section" hidden>
    <h2>The cube at work: mean |state| per cell, one depth layer each</h2>
    <div id="layers"></div>
    <div class="legend"><span>0</span><canvas id="legend" width="160" height="10"></canvas><span id="legend-max"></span></div>
    <p class="muted" id="trace-note"></p>
  </section>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);

async function call(path, body) {
  const init = body === undefined ? {} : {method: "POST", headers: {"content-type": "application/json"}, body: JSON.stringify(body)};
  const r = await fetch(path, init);
  const data = await r.json().catch(() => ({detail: r.statusText}));
  if (!r.ok) throw new Error(typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail));
  return data;
}

function text(tag, content, cls) {
  const el = document.createElement(tag);
  el.textContent = content;
  if (cls) el.className = cls;
  return el;
}

// viridis, five stops, interpolated
const STOPS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
function colour(t) {
  t = Math.max(0, Math.min(1, t)) * (STOPS.length - 1);
  const i = Math.min(Math.floor(t), STOPS.length - 2), f = t - i;
  return STOPS[i].map((c, k) => Math.round(c + f * (STOPS[i + 1][k] - c)));
}

function heatmap(grid, max, cell) {
  const h = grid.length, w = grid[0].length;
  const canvas = document.createElement("canvas");
  canvas.width = w * cell; canvas.height = h * cell;
  const ctx = canvas.getContext("2d");
  for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) {
    const [r, g, b] = colour(max > 0 ? grid[y][x] / max : 0);
    ctx.fillStyle = `rgb(${r},${g},${b})`;
    ctx.fillRect(x * cell, y * cell, cell, cell);
  }
  return canvas;
}

function showAnswers(data) {
  const list = $("answers");
  list.replaceChildren(...data.answers.map((a) => {
    const li = document.createElement("li");
    li.append(text("span", a.score.toFixed(3), "score"), " ", text("span", a.answer, "answer-text"));
    return li;
  }));
  const t = data.timings_ms;
  $("timings").textContent = `model ${data.model_version} · embed ${t.embed.toFixed(1)} ms ` +
    `(teacher ${t.teacher.toFixed(1)} ms) · cube ${t.cube.toFixed(1)} ms · search ${t.search.toFixed(1)} ms · ` +
    `total ${t.total.toFixed(1)} ms`;
  $("answers-section").hidden = false;
}

function showCompare(data) {
  const cols = [["cube", data.cube], ["identity baseline", data.identity],
                ["written from the cube", data.cube_written], [`teacher (${data.teacher.teacher})`, data.teacher]];
  $("compare").replaceChildren(...cols.map(([name, r]) => {
    const col = document.createElement("div");
    col.className = "col";
    col.append(text("h3", name));
    if (r.available === false) {
      col.append(text("p", "generation unavailable", "muted"), text("p", r.reason, "muted"));
    } else {
      col.append(text("p", r.answer));
      const extra = r.score === undefined ? "" : `score ${r.score.toFixed(3)} · `;
      col.append(text("p", `${extra}${r.ms.toFixed(1)} ms`, "muted"));
    }
    return col;
  }));
  $("compare-section").hidden = false;
}

function showTrace(data) {
  const cell = Math.max(6, Math.floor(180 / Math.max(data.height, data.width)));
  $("layers").replaceChildren(...data.layers.map((grid, d) => {
    const fig = document.createElement("figure");
    const role = d === 0 ? " (front: question)" : d === data.layers.length - 1 ? " (back: read out)" : "";
    fig.append(heatmap(grid, data.max, cell), text("figcaption", `layer ${d}${role}`));
    return fig;
  }));
  const legend = $("legend").getContext("2d");
  for (let x = 0; x < 160; x++) { const [r, g, b] = colour(x / 159); legend.fillStyle = `rgb(${r},${g},${b})`; legend.fillRect(x, 0, 1, 10); }
  $("legend-max").textContent = data.max.toFixed(3);
  $("trace-note").textContent = `${data.depth} layers of ${data.height}×${data.width} cells, ${data.channels} channels, ` +
    `${data.steps} steps; ${data.measure}.`;
  $("trace-section").hidden = false;
}

async function ask(event) {
  event.preventDefault();
  const question = $("question").value;
  $("error").textContent = "";
  $("ask").disabled = true;
  const jobs = [
    call("/v1/answer", {question, top_k: Number($("top-k").value)}).then(showAnswers),
    call("/v1/trace", {question}).then(showTrace),
    call("/v1/compare", {question}).then(showCompare),
  ];
  const results = await Promise.allSettled(jobs);
  const failed = results.filter((r) => r.status === "rejected").map((r) => r.reason.message);
  $("error").textContent = failed.length ? failed[0] : "";
  $("ask").disabled = false;
}

async function loadModel() {
  try {
    const m = await call("/v1/model");
    const mrr = m.held_out && m.held_out.cube ? ` · held-out MRR ${m.held_out.cube.mrr.toFixed(3)}` : "";
    $("model").textContent = `run ${m.run} (${m.model_version}) · teacher ${m.teacher.name} · ` +
      `${m.bank_size} answers in the bank${mrr}`;
  } catch (e) {
    $("model").textContent = `model not ready: ${e.message}`;
  }
}

$("ask-form").addEventListener("submit", ask);
loadModel();
</script>
</body>
</html>
"""
