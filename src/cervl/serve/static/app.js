// cervl web page: photos, webcam and video against the same server's /v1 API. No build step.
"use strict";

const $ = (id) => document.getElementById(id);
const COLORS = ["#e0662b", "#2f6fde", "#2a9d5c", "#b83280", "#8a6d1d", "#6b46c1", "#0f8b8d", "#c53030",
                "#4a5568", "#d69e2e", "#3182ce", "#38a169"];
let classes = [];

function headers(extra) {
  const h = Object.assign({}, extra || {});
  const key = $("apikey").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function showError(msg) {
  const b = $("banner");
  b.textContent = msg;
  b.classList.remove("hidden");
}

function clearError() { $("banner").classList.add("hidden"); }

async function api(path, options) {
  let res;
  try {
    res = await fetch(path, Object.assign({}, options, { headers: headers(options && options.headers) }));
  } catch (e) {
    throw new Error("cannot reach the server: " + e.message);
  }
  let body = null;
  try { body = await res.json(); } catch (e) { /* not JSON */ }
  if (!res.ok) throw new Error((body && body.error) || ("HTTP " + res.status));
  return body;
}

// --- bars ----------------------------------------------------------------------------------
function renderBars(el, probs) {
  el.innerHTML = "";
  const entries = classes.map((c) => [c, probs[c]]);
  const top = entries.reduce((a, b) => (b[1] > a[1] ? b : a))[0];
  for (const [c, p] of entries) {
    const cls = c === top ? " top" : "";
    const label = document.createElement("div");
    label.className = "label" + cls;
    label.textContent = c;
    const track = document.createElement("div");
    track.className = "track" + cls;
    const fill = document.createElement("div");
    fill.className = "fill";
    fill.style.width = (100 * p).toFixed(1) + "%";
    track.appendChild(fill);
    track.dataset.class = c;
    track.dataset.prob = String(p);
    const value = document.createElement("div");
    value.className = "value" + cls;
    value.textContent = (100 * p).toFixed(1) + "%";
    el.append(label, track, value);
  }
  el.dataset.top = top;
}

// --- photos --------------------------------------------------------------------------------
function photoCard(file) {
  const card = document.createElement("div");
  card.className = "card";
  card.dataset.testid = "card";
  const photo = document.createElement("div");
  photo.className = "photo";
  const frame = document.createElement("div");
  frame.className = "frame";  // the canvas and, with "show where the model looks", the map over it
  const canvas = document.createElement("canvas");
  frame.appendChild(canvas);
  photo.appendChild(frame);
  const info = document.createElement("div");
  info.className = "info";
  info.innerHTML = '<div class="name"></div><div class="meta">scoring…</div><div class="bars"></div>';
  info.querySelector(".name").textContent = file.name;
  card.append(photo, info);
  $("results").prepend(card);
  return { card, canvas, info, photo };
}

function drawPhoto(canvas, img, box) {
  canvas.width = img.naturalWidth;
  canvas.height = img.naturalHeight;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0);
  if (box) {
    ctx.strokeStyle = "#e0662b";
    ctx.lineWidth = Math.max(2, img.naturalWidth / 150);
    ctx.strokeRect(box[0], box[1], box[2] - box[0], box[3] - box[1]);
    canvas.dataset.box = JSON.stringify(box);
  }
}

async function predictPhoto(file) {
  const { card, canvas, info, photo } = photoCard(file);
  const url = URL.createObjectURL(file);
  const img = new Image();
  const loaded = new Promise((ok) => { img.onload = ok; img.onerror = ok; });
  img.src = url;
  const form = new FormData();
  form.append("file", file);
  try {
    const r = await api("/v1/predict?align=" + $("align").checked + "&explain=" + $("explain").checked,
                        { method: "POST", body: form });
    await loaded;
    drawPhoto(canvas, img, r.face && r.face.box);
    const meta = info.querySelector(".meta");
    if (!r.probs) {
      meta.textContent = "no face found (" + (r.face ? r.face.status : "?") + ")";
      card.dataset.state = "noface";
      return;
    }
    meta.textContent = r.pred + " · " + r.latency_ms + " ms" + (r.face ? " · face " + r.face.status : "");
    renderBars(info.querySelector(".bars"), r.probs);
    if (r.explain) showHeat(photo, r.explain);
    card.dataset.state = "done";
  } catch (e) {
    await loaded;
    if (img.naturalWidth) drawPhoto(canvas, img, null);
    info.querySelector(".meta").textContent = "";
    const err = document.createElement("div");
    err.className = "error";
    err.dataset.testid = "card-error";
    err.textContent = file.name + ": " + e.message;
    info.appendChild(err);
    card.dataset.state = "error";
    showError(file.name + ": " + e.message);
  }
}

// The predicted class's map, laid over the photo (the server warps it back from the aligned face).
function showHeat(photo, ex) {
  const heat = document.createElement("img");
  heat.className = "heat";
  heat.dataset.testid = "heat";
  heat.dataset.class = ex.class;
  heat.alt = "where the model looks for " + ex.class;
  heat.src = ex.overlay;
  const note = document.createElement("div");
  note.className = "heatnote";
  note.textContent = "colour: where " + ex.class + " comes from (" + ex.method + ")";
  photo.querySelector(".frame").appendChild(heat);
  photo.appendChild(note);
}

function handleFiles(files) {
  clearError();
  for (const f of files) predictPhoto(f);
}

// --- webcam --------------------------------------------------------------------------------
const cam = { stream: null, timer: null, history: [], busy: false, frames: 0 };

async function startCam() {
  clearError();
  try {
    cam.stream = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 }, audio: false });
  } catch (e) {
    showError("webcam: " + e.message);
    return;
  }
  $("camvideo").srcObject = cam.stream;
  $("camstart").disabled = true;
  $("camstop").disabled = false;
  $("camstatus").textContent = "live";
  cam.timer = setInterval(camTick, 300);  // a few frames a second
}

function stopCam() {
  clearInterval(cam.timer);
  if (cam.stream) cam.stream.getTracks().forEach((t) => t.stop());
  cam.stream = null;
  $("camstart").disabled = false;
  $("camstop").disabled = true;
  $("camstatus").textContent = "off";
}

async function camTick() {
  const v = $("camvideo");
  if (cam.busy || !v.videoWidth) return;
  cam.busy = true;
  const c = document.createElement("canvas");
  c.width = v.videoWidth;
  c.height = v.videoHeight;
  c.getContext("2d").drawImage(v, 0, 0);
  const blob = await new Promise((ok) => c.toBlob(ok, "image/jpeg", 0.85));
  const form = new FormData();
  form.append("file", blob, "frame.jpg");
  try {
    const r = await api("/v1/predict?align=" + $("align").checked + "&explain=" + $("explain").checked,
                        { method: "POST", body: form });
    cam.frames += 1;
    $("camstatus").textContent = "live · frame " + cam.frames + (r.probs ? " · " + r.pred : " · no face");
    $("camstatus").dataset.frames = String(cam.frames);
    if (r.probs) {
      renderBars($("cambars"), r.probs);
      cam.history.push(r.probs);
      if (cam.history.length > 60) cam.history.shift();
      drawTimeline($("camtimeline"), cam.history.map((p) => classes.map((k) => p[k])), null, 3);
    }
  } catch (e) {
    showError("webcam: " + e.message);
  } finally {
    cam.busy = false;
  }
}

// --- timelines -----------------------------------------------------------------------------
function drawTimeline(canvas, series, frames, onlyTop) {
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height, pad = 28;
  ctx.clearRect(0, 0, W, H);
  ctx.strokeStyle = "#c8ccd4";
  ctx.strokeRect(pad, 6, W - pad - 6, H - pad - 6);
  ctx.fillStyle = "#5b6577";
  ctx.font = "11px sans-serif";
  ctx.fillText("1", 8, 14);
  ctx.fillText("0", 8, H - pad);
  const n = series.length;
  if (!n) return;
  let show = classes.map((_, k) => k);
  if (onlyTop) {
    const mean = classes.map((_, k) => series.reduce((s, p) => s + (p ? p[k] : 0), 0));
    show = show.sort((a, b) => mean[b] - mean[a]).slice(0, onlyTop);
  }
  const x = (i) => pad + (n === 1 ? 0 : (i / (n - 1)) * (W - pad - 6));
  const y = (p) => 6 + (1 - p) * (H - pad - 12);
  for (const k of show) {
    ctx.strokeStyle = COLORS[k % COLORS.length];
    ctx.lineWidth = 1.6;
    ctx.beginPath();
    let started = false;
    series.forEach((p, i) => {
      if (!p) { started = false; return; }
      if (!started) { ctx.moveTo(x(i), y(p[k])); started = true; } else ctx.lineTo(x(i), y(p[k]));
    });
    ctx.stroke();
  }
  if (frames) {
    ctx.fillStyle = "#5b6577";
    ctx.fillText("frame " + frames[0], pad, H - 8);
    ctx.fillText(String(frames[frames.length - 1]), W - 40, H - 8);
  }
}

// --- video ---------------------------------------------------------------------------------
async function uploadVideo(file) {
  clearError();
  const status = $("videostatus"), bar = $("videoprogress");
  status.textContent = "uploading " + file.name + "…";
  bar.classList.remove("hidden");
  bar.value = 0;
  const form = new FormData();
  form.append("file", file);
  let job;
  try {
    job = await api("/v1/predict/video", { method: "POST", body: form });
  } catch (e) {
    status.textContent = "";
    bar.classList.add("hidden");
    showError(file.name + ": " + e.message);
    return;
  }
  for (;;) {
    await new Promise((ok) => setTimeout(ok, 400));
    let j;
    try { j = await api(job.status_url); } catch (e) { showError(e.message); return; }
    if (j.progress !== undefined) bar.value = j.progress;
    status.textContent = j.status + " · " + j.frames_done + (j.frames_total ? "/" + j.frames_total : "") + " frames";
    if (j.status === "failed") { bar.classList.add("hidden"); showError(file.name + ": " + j.error); return; }
    if (j.status === "done") { bar.classList.add("hidden"); showVideo(j); return; }
  }
}

function showVideo(j) {
  const plot = $("videoplot");
  plot.classList.remove("hidden");
  drawTimeline(plot, j.timeline.smoothed, j.timeline.frames, 0);
  plot.dataset.frames = String(j.timeline.frames.length);
  $("legend").innerHTML = j.classes.map((c, k) => '<span style="--c:' + COLORS[k % COLORS.length] + '">' + c + "</span>").join("");
  const s = j.summary;
  $("videosummary").textContent = s.frames + " frames, " + s.frames_with_face + " with a face; dominant: " + (s.dominant || "none");
  const tbody = $("segments").querySelector("tbody");
  tbody.innerHTML = "";
  for (const seg of j.segments) {
    const tr = document.createElement("tr");
    for (const v of [seg.start_frame, seg.end_frame, seg.frames, seg.pred, seg.mean_prob]) {
      const td = document.createElement("td");
      td.textContent = String(v);
      tr.appendChild(td);
    }
    tbody.appendChild(tr);
  }
  $("segments").classList.remove("hidden");
  $("videostatus").textContent = "done · " + j.segments.length + " segments";
  $("videostatus").dataset.done = "1";
}

// --- wiring --------------------------------------------------------------------------------
async function init() {
  $("apikey").value = localStorage.getItem("cervl-api-key") || "";
  $("apikey").addEventListener("change", () => { localStorage.setItem("cervl-api-key", $("apikey").value); loadModel(); });
  document.querySelectorAll(".tab").forEach((t) => t.addEventListener("click", () => {
    document.querySelectorAll(".tab").forEach((x) => x.classList.toggle("active", x === t));
    document.querySelectorAll(".panel").forEach((p) => p.classList.toggle("hidden", p.id !== t.dataset.tab));
    if (t.dataset.tab !== "webcam") stopCam();
  }));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); handleFiles(e.dataTransfer.files); });
  $("files").addEventListener("change", (e) => handleFiles(e.target.files));
  $("camstart").addEventListener("click", startCam);
  $("camstop").addEventListener("click", stopCam);
  $("videofile").addEventListener("change", (e) => { if (e.target.files[0]) uploadVideo(e.target.files[0]); });
  await loadModel();
}

async function loadModel() {
  try {
    const m = await api("/v1/model");
    classes = m.classes;
    $("align").checked = m.align_default;
    $("model").textContent = "label set " + m.label_set + " (" + m.classes.length + " classes) · prompt " + m.prompt
      + (m.base_model ? " · base " + m.base_model : "");
    const trained = document.createElement("span");
    trained.className = "trained";
    trained.dataset.testid = "trained";
    trained.textContent = "trained: " + m.stages_summary
      + (m.trained_on && m.trained_on.length ? " on " + m.trained_on.join(", ") : "");
    $("model").appendChild(trained);
    if (m.notice) {
      $("notice").textContent = m.notice;
      $("notice").classList.remove("hidden");
    }
    clearError();
  } catch (e) {
    $("model").textContent = "model unavailable";
    showError("model: " + e.message);
  }
}

init();
