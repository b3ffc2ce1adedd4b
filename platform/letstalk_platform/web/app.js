// The LetsTalk page: plain JavaScript against the render API (docs/web.md). The token stays in this
// tab's sessionStorage; every request sends it as a bearer header, so the video and the progress
// stream are fetched (not linked) and the stream is read from fetch's body (EventSource cannot send
// headers).
"use strict";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "letstalk-token";
const state = { portrait: null, audio: null, audioName: null, job: null, stream: null, videoUrl: null };

function showError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

async function api(path, options = {}) {
  const headers = { Authorization: "Bearer " + $("token").value.trim(), ...(options.headers || {}) };
  const response = await fetch(path, { ...options, headers });
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error || message; } catch (e) { /* not JSON */ }
    const after = response.headers.get("Retry-After");
    if (after) message += ` (try again in ${after} s)`;
    throw new Error(message);
  }
  return response;
}

async function loadModel() {
  const note = $("model");
  if (!$("token").value.trim()) { note.textContent = "Paste the server's token to start."; return; }
  try {
    const info = await (await api("/v1/model")).json();
    note.textContent = `Model ${info.model}: ${info.image_size}×${info.image_size} px, ${info.fps} fps, ` +
      `up to ${info.limits.max_audio_seconds} s of audio and ${info.limits.max_upload_mb} MB per file.`;
    refreshPast();
  } catch (e) {
    note.textContent = e.message;
  }
}

async function setPortrait(file) {
  state.portrait = file;
  showError("");
  const form = new FormData();
  form.append("portrait", file, file.name || "portrait");
  try {
    const response = await api("/v1/crop", { method: "POST", body: form });
    const found = response.headers.get("X-Face-Found") === "true";
    $("crop").src = URL.createObjectURL(await response.blob());
    $("crop-note").textContent = found ? "The face the video will animate."
      : "No face found: the centre of the image will be used.";
    $("crop-figure").hidden = false;
  } catch (e) {
    $("crop-figure").hidden = true;
    showError(e.message);
  }
}

function setAudio(blob, name) {
  state.audio = blob;
  state.audioName = name;
  $("audio-preview").src = URL.createObjectURL(blob);
  $("audio-preview").hidden = false;
}

function dropZone(zone, input, accept) {
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    const file = e.dataTransfer.files[0];
    if (file) accept(file);
  });
  input.addEventListener("change", () => { if (input.files[0]) accept(input.files[0]); });
}

function setupRecording() {
  if (!(navigator.mediaDevices && window.MediaRecorder)) return; // the button stays hidden
  const button = $("record");
  button.hidden = false;
  let recorder = null;
  button.addEventListener("click", async () => {
    if (recorder) { recorder.stop(); return; }
    try {
      const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
      const chunks = [];
      recorder = new MediaRecorder(stream);
      recorder.ondataavailable = (e) => chunks.push(e.data);
      recorder.onstop = () => {
        stream.getTracks().forEach((t) => t.stop());
        const type = recorder.mimeType || "audio/webm";
        setAudio(new Blob(chunks, { type }), type.includes("ogg") ? "recording.ogg" : "recording.webm");
        recorder = null;
        button.textContent = "record from the microphone";
      };
      recorder.start();
      button.textContent = "stop recording";
    } catch (e) {
      showError("The microphone is not available: " + e.message);
    }
  });
}

function describe(job) {
  const p = job.progress;
  if (job.status === "queued") return "Waiting for a free renderer…";
  if (job.status === "running") {
    const eta = p.eta_s == null ? "" : ` · about ${Math.ceil(p.eta_s)} s left`;
    return `Rendering clip ${Math.min(p.clips_done + 1, p.clips_total)} of ${p.clips_total} · ` +
      `${Math.round(p.fraction * 100)} %${eta}`;
  }
  if (job.status === "done") return `Done: ${job.audio_seconds.toFixed(1)} s of video.`;
  if (job.status === "cancelled") return "Cancelled.";
  return "Failed: " + (job.error || "unknown error");
}

function showJob(job) {
  $("progress").value = job.progress.fraction;
  $("progress-text").textContent = describe(job);
  $("cancel").hidden = !(job.status === "queued" || job.status === "running");
  if (job.status === "failed") showError(job.error);
}

async function follow(id) {
  // Server-Sent Events read from a fetch body: one `data:` JSON line per block, the last one final
  const response = await api(`/v1/renders/${id}/events`);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", last = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("");
      if (data) { last = JSON.parse(data); showJob(last); }
    }
  }
  return last;
}

async function showVideo(id) {
  const blob = await (await api(`/v1/renders/${id}/video`)).blob();
  if (state.videoUrl) URL.revokeObjectURL(state.videoUrl);
  state.videoUrl = URL.createObjectURL(blob);
  $("job").hidden = false;
  $("video").src = state.videoUrl;
  $("video").hidden = false;
  $("download").href = state.videoUrl;
  $("download").download = `letstalk-${id.slice(0, 8)}.mp4`;
  $("download").hidden = false;
}

async function render(event) {
  event.preventDefault();
  showError("");
  if (!$("token").value.trim()) { showError("Paste the API token first."); $("token").focus(); return; }
  if (!state.portrait) { showError("Choose a portrait image."); $("portrait").focus(); return; }
  if (!state.audio) { showError("Choose or record the speech audio."); $("audio").focus(); return; }
  const form = new FormData();
  form.append("portrait", state.portrait, state.portrait.name || "portrait");
  form.append("audio", state.audio, state.audioName || "speech");
  const quality = $("quality").value;
  if (quality) {
    const [sampler, steps] = quality.split(":");
    form.append("sampler", sampler);
    form.append("steps", steps);
  }
  form.append("seed", $("seed").value || "0");
  if (!$("paste-back").checked) form.append("paste_back", "false");  // checked: the server's auto
  $("render").disabled = true;
  $("job").hidden = true;  // the last render's progress and video go until this one is accepted
  $("video").hidden = true;
  $("download").hidden = true;
  try {
    const accepted = await (await api("/v1/renders", { method: "POST", body: form })).json();
    state.job = accepted.id;
    $("job").hidden = false;
    $("progress").value = 0;
    $("progress-text").textContent = "Queued…";
    const final = await follow(accepted.id);
    if (final && final.status === "done") await showVideo(accepted.id);
  } catch (e) {
    showError(e.message);
  } finally {
    $("render").disabled = false;
    $("cancel").hidden = true;
    refreshPast();
  }
}

async function refreshPast() {
  if (!$("token").value.trim()) return;
  try {
    const list = await (await api("/v1/renders?limit=20")).json();
    const rows = list.jobs.map((job) => {
      const tr = document.createElement("tr");
      const cells = [new Date(job.created * 1000).toLocaleString(), job.status,
        `${job.audio_seconds.toFixed(1)} s`];
      for (const text of cells) {
        const td = document.createElement("td");
        td.textContent = text;
        tr.appendChild(td);
      }
      const td = document.createElement("td");
      if (job.status === "done") {
        const button = document.createElement("button");
        button.type = "button";
        button.textContent = "show";
        button.addEventListener("click", () => showVideo(job.id).catch((e) => showError(e.message)));
        td.appendChild(button);
      }
      tr.appendChild(td);
      return tr;
    });
    $("past").replaceChildren(...rows);
  } catch (e) {
    showError(e.message);
  }
}

window.addEventListener("DOMContentLoaded", () => {
  $("token").value = sessionStorage.getItem(TOKEN_KEY) || "";
  $("token").addEventListener("change", () => {
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    loadModel();
  });
  dropZone($("portrait-drop"), $("portrait"), setPortrait);
  dropZone($("audio-drop"), $("audio"), (file) => setAudio(file, file.name));
  setupRecording();
  $("render-form").addEventListener("submit", render);
  $("cancel").addEventListener("click", () => {
    if (state.job) api(`/v1/renders/${state.job}`, { method: "DELETE" }).catch((e) => showError(e.message));
  });
  $("refresh").addEventListener("click", refreshPast);
  loadModel();
});
