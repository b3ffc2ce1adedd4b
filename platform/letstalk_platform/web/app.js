// The LetsTalk page: plain JavaScript against the render API (docs/web.md). The token stays in this
// tab's sessionStorage; every request sends it as a bearer header, so the video and the progress
// stream are fetched (not linked) and the stream is read from fetch's body (EventSource cannot send
// headers). "Play while rendering" reads the growing mp4 the same way and feeds it to a MediaSource.
"use strict";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "letstalk-token";
const state = { portrait: null, audio: null, audioName: null, job: null, stream: null, videoUrl: null, avatar: false };

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
    // a re-voicing avatar speaks over its own footage: no portrait to choose, nothing to paste back into
    state.avatar = info.mode === "revoice";
    $("portrait-drop").hidden = state.avatar;
    $("paste-back-row").hidden = state.avatar;
    const what = state.avatar
      ? `Avatar ${info.model}: speaks over its own footage (${info.footage.width}×${info.footage.height}, ` +
        `${info.footage.frames} frames); give the speech alone. `
      : `Model ${info.model}: ${info.image_size}×${info.image_size} px, `;
    note.textContent = what + `${info.fps} fps, ` +
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

// ---- play while rendering: GET /stream (a fragmented mp4, growing) into a MediaSource

function concat(a, b) {
  const out = new Uint8Array(a.length + b.length);
  out.set(a);
  out.set(b, a.length);
  return out;
}

function initEnd(bytes) {
  // where the header (ftyp + moov, the init segment) ends, or -1 until all of it has arrived
  let at = 0;
  while (at + 8 <= bytes.length) {
    const size = new DataView(bytes.buffer, bytes.byteOffset + at, 4).getUint32(0);
    const type = String.fromCharCode(...bytes.subarray(at + 4, at + 8));
    if (type === "moov") return at + size <= bytes.length ? at + size : -1;
    if (size < 8) return -1;
    at += size;
  }
  return -1;
}

function indexOf(bytes, text) {
  const codes = [...text].map((c) => c.charCodeAt(0));
  outer: for (let i = 0; i + codes.length <= bytes.length; i++) {
    for (let k = 0; k < codes.length; k++) if (bytes[i + k] !== codes[k]) continue outer;
    return i;
  }
  return -1;
}

function mimeOf(header) {
  // the SourceBuffer needs the exact codecs: x264 picks the H.264 profile and level from the frame
  // size, so they are read from the file's avcC record (profile, compatibility, level after its type)
  const avcC = indexOf(header, "avcC");
  if (avcC < 0 || avcC + 8 > header.length) return null;
  const hex = (i) => header[avcC + i].toString(16).padStart(2, "0");
  const video = `avc1.${hex(5)}${hex(6)}${hex(7)}`;
  return `video/mp4; codecs="${indexOf(header, "mp4a") >= 0 ? video + ", mp4a.40.2" : video}"`;  // AAC-LC
}

function appendTo(buffer, bytes) {
  return new Promise((resolve, reject) => {
    const done = () => { buffer.removeEventListener("error", fail); resolve(); };
    const fail = () => {
      buffer.removeEventListener("updateend", done);
      reject(new Error("the browser could not play the stream"));
    };
    buffer.addEventListener("updateend", done, { once: true });
    buffer.addEventListener("error", fail, { once: true });
    buffer.appendBuffer(bytes);
  });
}

async function playWhileRendering(id) {
  // true: the whole video went into the <video> as it rendered; false: this browser cannot (no
  // MediaSource, or not these codecs), the page shows the finished file instead
  const response = await api(`/v1/renders/${id}/stream`);
  const reader = response.body.getReader();
  let head = new Uint8Array(0), end = -1;
  while (end < 0) {
    const { value, done } = await reader.read();
    if (done) return false;  // the job failed or was cancelled before its first frame
    head = concat(head, value);
    end = initEnd(head);
  }
  const mime = mimeOf(head.subarray(0, end));
  if (!mime || !MediaSource.isTypeSupported(mime)) {
    reader.cancel();
    return false;
  }
  const source = new MediaSource();
  const video = $("video");
  video.src = URL.createObjectURL(source);
  await new Promise((resolve) => source.addEventListener("sourceopen", resolve, { once: true }));
  URL.revokeObjectURL(video.src);
  const buffer = source.addSourceBuffer(mime);
  await appendTo(buffer, head);  // one append at a time: the next waits for this one's updateend
  video.hidden = false;
  video.play().catch(() => {});  // the Render click allows it; where not, the controls do
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    await appendTo(buffer, value);
  }
  source.endOfStream();
  return true;
}

async function showVideo(id, playing = false) {
  // `playing`: the video element already has the whole video (played while rendering); only the
  // download link needs the file
  const blob = await (await api(`/v1/renders/${id}/video`)).blob();
  if (state.videoUrl) URL.revokeObjectURL(state.videoUrl);
  state.videoUrl = URL.createObjectURL(blob);
  $("job").hidden = false;
  if (!playing) $("video").src = state.videoUrl;
  $("video").hidden = false;
  $("download").href = state.videoUrl;
  $("download").download = `letstalk-${id.slice(0, 8)}.mp4`;
  $("download").hidden = false;
}

async function render(event) {
  event.preventDefault();
  showError("");
  if (!$("token").value.trim()) { showError("Paste the API token first."); $("token").focus(); return; }
  if (!state.avatar && !state.portrait) { showError("Choose a portrait image."); $("portrait").focus(); return; }
  if (!state.audio) { showError("Choose or record the speech audio."); $("audio").focus(); return; }
  const form = new FormData();
  if (!state.avatar) form.append("portrait", state.portrait, state.portrait.name || "portrait");
  form.append("audio", state.audio, state.audioName || "speech");
  const quality = $("quality").value;
  if (quality) {
    const [sampler, steps] = quality.split(":");
    form.append("sampler", sampler);
    form.append("steps", steps);
  }
  form.append("seed", $("seed").value || "0");
  if (!state.avatar && !$("paste-back").checked) form.append("paste_back", "false");  // checked: the server's auto
  const streaming = $("stream").checked;
  if (streaming) form.append("stream", "true");
  $("render").disabled = true;
  $("job").hidden = true;  // the last render's progress and video go until this one is accepted
  $("video").pause();
  $("video").hidden = true;
  $("download").hidden = true;
  try {
    const accepted = await (await api("/v1/renders", { method: "POST", body: form })).json();
    state.job = accepted.id;
    $("job").hidden = false;
    $("progress").value = 0;
    $("progress-text").textContent = "Queued…";
    const played = !streaming ? Promise.resolve(false) : playWhileRendering(accepted.id).catch((e) => {
      console.warn("play while rendering:", e.message);  // the finished file is shown instead
      return false;
    });
    const final = await follow(accepted.id);
    const whole = await played;  // the stream ends with the job
    if (final && final.status === "done") await showVideo(accepted.id, whole);
    else $("video").hidden = true;
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
  if (!(window.MediaSource && MediaSource.isTypeSupported('video/mp4; codecs="avc1.640028, mp4a.40.2"'))) {
    $("stream").checked = false;  // the video shows when done, as without the option
    $("stream").disabled = true;
    $("stream-note").textContent = "this browser cannot play an mp4 while it arrives (no Media Source Extensions)";
  }
  $("render-form").addEventListener("submit", render);
  $("cancel").addEventListener("click", () => {
    if (state.job) api(`/v1/renders/${state.job}`, { method: "DELETE" }).catch((e) => showError(e.message));
  });
  $("refresh").addEventListener("click", refreshPast);
  loadModel();
});
