// magi-serve's page: creates a video over the live WebSocket (GET /v1/videos/live), plays its fragmented mp4
// as the chunks arrive (player.js), lets the viewer change the prompt of the chunks still to come, and lists the
// server's videos (GET /v1/videos). All URLs are relative to the page, so it also works under a path prefix.

import { MsePlayer } from "./player.js";

const $ = (id) => document.getElementById(id);
// Frames per chunk when the server does not say (both the released models and the tiny preset use 24).
const DEFAULT_CHUNK_FRAMES = 24;

// What the page knows about the server (GET v1/magi/info).
const server = { chunkFrames: DEFAULT_CHUNK_FRAMES, known: false };
// The live session: one job at a time.
let session = null;

// Figures a test (or a curious viewer, in the console) can read: reset for every job.
window.magiStats = null;

// ---------------------------------------------------------------------------------------------- helpers

function apiKey() {
  return $("api-key").value.trim();
}

function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function showError(message) {
  $("error-text").textContent = message;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error-text").textContent = "";
}

function setStatus(text) {
  $("status").textContent = text;
}

// The message of an OpenAI-style error body ({"error": {"message", ...}}), else the HTTP status.
async function errorMessage(response) {
  let detail = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) detail = `${response.status}: ${body.error.message}`;
  } catch (_) {
    /* not JSON */
  }
  return detail;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  if (!response.ok) throw new Error(`${options.method || "GET"} ${path} failed: ${await errorMessage(response)}`);
  return response;
}

function intField(id) {
  const raw = $(id).value.trim();
  if (raw === "") return null;
  const value = Number(raw);
  if (!Number.isInteger(value) || value < 0) throw new Error(`${$(id).labels[0].textContent.trim()}: ${raw} is not a whole number`);
  return value;
}

// ------------------------------------------------------------------------------------- server settings

async function loadServerInfo() {
  // GET v1/magi/info: the served model's frames per chunk, default steps and the server's limits.
  try {
    const response = await fetch("v1/magi/info", { headers: authHeaders() });
    if (response.ok) {
      const info = await response.json();
      server.info = info;
      if (Number.isInteger(info.chunk_frames) && info.chunk_frames > 0) {
        server.chunkFrames = info.chunk_frames;
        server.known = true;
      }
      if (info.num_steps) $("num-steps").placeholder = `default ${info.num_steps}`;
      if (info.max_steps) $("num-steps").max = info.max_steps;
      if (info.max_frames) $("num-frames").max = info.max_frames;
    }
  } catch (_) {
    /* an older server: keep the default */
  }
  updateFramesHint();
}

function updateFramesHint() {
  let text;
  try {
    const frames = intField("num-frames");
    const chunks = intField("num-chunks") || 1;
    text = frames ? `${frames} frames` : `${chunks} chunk${chunks === 1 ? "" : "s"} = ${chunks * server.chunkFrames} frames`;
  } catch (e) {
    text = e.message;
  }
  let per = server.known ? `${server.chunkFrames} frames per chunk` : `assuming ${server.chunkFrames} frames per chunk`;
  const info = server.info;
  if (info && info.width && info.height) per += `, ${info.width}x${info.height} at ${info.fps} fps`;
  if (info && info.max_frames) per += `, at most ${info.max_frames} frames`;
  $("frames-hint").textContent = `${text} (${per})`;
}

// ------------------------------------------------------------------------------------------ chunk table

function renderChunks() {
  const body = $("chunks-body");
  body.replaceChildren();
  if (!session) return;
  session.chunks.forEach((chunk, index) => {
    const row = document.createElement("tr");
    row.id = `chunk-${index}`;
    row.dataset.state = chunk.state;
    const cells = [String(index), chunk.state, chunk.prompt];
    cells.forEach((text, i) => {
      const cell = document.createElement("td");
      cell.textContent = text;
      if (i === 1) cell.className = `state-${chunk.state}`;
      if (i === 2) cell.className = chunk.changed ? "prompt changed" : "prompt";
      row.append(cell);
    });
    body.append(row);
  });
}

// The prompt of each chunk as the request asked for it (the last of `prompts` repeats).
function plannedPrompts(prompt, prompts, numChunks) {
  const list = prompts && prompts.length ? prompts : [prompt];
  return Array.from({ length: numChunks }, (_, i) => list[Math.min(i, list.length - 1)]);
}

function ensureChunks(numChunks) {
  const chunks = session.chunks;
  while (chunks.length < numChunks) {
    const last = chunks.length ? chunks[chunks.length - 1].prompt : session.request.prompt;
    chunks.push({ state: "waiting", prompt: last, changed: false });
  }
}

function logPrompt(text, className) {
  const item = document.createElement("li");
  item.textContent = text;
  if (className) item.className = className;
  $("prompt-log").append(item);
  return item;
}

// ------------------------------------------------------------------------------------------- live job

function liveSocketUrl() {
  const url = new URL("v1/videos/live", window.location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  const key = apiKey();
  if (key) url.searchParams.set("api_key", key);
  return url.toString();
}

function buildRequest() {
  const prompt = $("prompt").value.trim();
  if (!prompt) throw new Error("Prompt: write what the video should show");
  const request = { type: "create", prompt, mode: "t2v" };
  const lines = $("chunk-prompts").value.split("\n").map((l) => l.trim()).filter((l) => l);
  if (lines.length) request.prompts = lines;
  const frames = intField("num-frames");
  const chunks = intField("num-chunks");
  if (frames) request.num_frames = frames;
  else request.num_frames = (chunks || 1) * server.chunkFrames;
  const steps = intField("num-steps");
  if (steps) request.num_steps = steps;
  const seed = intField("seed");
  if (seed !== null) request.seed = seed;
  return request;
}

function setRunning(running) {
  $("generate").disabled = running;
  $("cancel").disabled = !running;
  $("next-prompt").disabled = !running;
  $("send-prompt").disabled = !running;
}

function newStats() {
  return {
    startedAt: performance.now(),
    createdAt: null,
    videoId: null,
    chunksReceived: 0,
    chunkSeconds: [], // after Generate, when each "chunk" message arrived
    doneSeconds: null,
    bytesReceived: 0,
    framesPresented: 0,
    firstFrameSeconds: null, // after Generate was pressed
    chunksAtFirstFrame: null, // "chunk" messages received when the first frame was shown
    codec: null,
    promptsAccepted: [],
    promptsApplied: [],
    done: false,
    cancelled: false,
    error: null,
  };
}

// Counts the frames the video element actually presents (requestVideoFrameCallback), so "it plays" is
// measured, not assumed from the bytes received.
function watchFrames(video, stats) {
  if (!("requestVideoFrameCallback" in HTMLVideoElement.prototype)) return;
  const onFrame = (_now, metadata) => {
    if (window.magiStats !== stats) return; // a newer job took over
    stats.framesPresented = metadata.presentedFrames;
    if (stats.firstFrameSeconds === null) {
      stats.firstFrameSeconds = (performance.now() - stats.startedAt) / 1000;
      stats.chunksAtFirstFrame = stats.chunksReceived;
      const total = session ? session.chunks.length : "?";
      $("first-frame").textContent =
        `First frame played ${stats.firstFrameSeconds.toFixed(2)} s after Generate; the server had announced ` +
        `${stats.chunksAtFirstFrame} of ${total} chunks complete by then.` + (stats.codec ? ` (${stats.codec})` : "");
    }
    video.requestVideoFrameCallback(onFrame);
  };
  video.requestVideoFrameCallback(onFrame);
}

function startJob(event) {
  event.preventDefault();
  clearError();
  let request;
  try {
    request = buildRequest();
  } catch (e) {
    showError(e.message);
    return;
  }
  if (session) endSession();
  const stats = newStats();
  window.magiStats = stats;
  const video = $("video");
  const player = new MsePlayer(video, {
    onError: (message) => {
      stats.error = message;
      showError(message);
    },
    onCodec: (mime) => {
      stats.codec = mime;
    },
  });
  const numChunks = Math.max(1, Math.ceil(request.num_frames / server.chunkFrames));
  session = {
    request,
    player,
    stats,
    job: null,
    finished: false,
    chunks: plannedPrompts(request.prompt, request.prompts, numChunks).map((prompt) => ({ state: "waiting", prompt, changed: false })),
    pendingPrompts: [], // log items of prompts accepted but not yet applied
  };
  $("prompt-log").replaceChildren();
  $("first-frame").textContent = "";
  $("progress").value = 0;
  $("progress-text").textContent = "";
  renderChunks();
  watchFrames(video, stats);
  setRunning(true);
  setStatus("Connecting…");

  const ws = new WebSocket(liveSocketUrl());
  ws.binaryType = "arraybuffer";
  session.ws = ws;
  const mine = session;
  ws.onopen = () => {
    setStatus("Waiting for the server to accept the job…");
    ws.send(JSON.stringify(request));
  };
  ws.onmessage = (message) => {
    if (session !== mine) return;
    if (typeof message.data !== "string") {
      stats.bytesReceived += message.data.byteLength;
      player.push(message.data);
      return;
    }
    let data;
    try {
      data = JSON.parse(message.data);
    } catch (_) {
      showError(`the server sent a message that is not JSON: ${message.data.slice(0, 200)}`);
      return;
    }
    onServerMessage(mine, data);
  };
  ws.onerror = () => {
    if (session === mine && !mine.finished) showError(`the WebSocket to ${ws.url.split("?")[0]} failed`);
  };
  ws.onclose = (close) => {
    if (session !== mine) return;
    player.end();
    if (!mine.finished) {
      const why = close.reason ? `: ${close.reason}` : "";
      const text = `the server closed the connection before the video was done (code ${close.code}${why})`;
      stats.error = stats.error || text;
      showError(text);
      setStatus("Disconnected.");
    }
    setRunning(false);
    loadJobs();
  };
}

function onServerMessage(mine, data) {
  const stats = mine.stats;
  switch (data.type) {
    case "created":
      mine.job = data.video;
      stats.createdAt = performance.now();
      stats.videoId = data.video.id;
      setStatus(`Job ${data.video.id}: ${data.video.status}.`);
      loadJobs();
      break;
    case "progress": {
      $("progress").value = data.progress;
      const next = mine.chunks.find((c) => c.state !== "done");
      if (next && next.state === "waiting") {
        next.state = "denoising";
        renderChunks();
      }
      const steps = data.total_steps ? ` (step ${data.step} of ${data.total_steps})` : "";
      $("progress-text").textContent = `${Math.round(data.progress)}%${steps}`;
      break;
    }
    case "chunk": {
      stats.chunksReceived += 1;
      stats.chunkSeconds.push((performance.now() - stats.startedAt) / 1000);
      ensureChunks(data.num_chunks);
      mine.chunks.length = Math.max(data.num_chunks, 0);
      const chunk = mine.chunks[data.index];
      chunk.state = "done";
      chunk.prompt = data.prompt;
      if (data.index + 1 < mine.chunks.length && mine.chunks[data.index + 1].state === "waiting") {
        mine.chunks[data.index + 1].state = "denoising";
      }
      setStatus(`Chunk ${data.index + 1} of ${data.num_chunks} generated (${data.seconds.toFixed(1)} s).`);
      renderChunks();
      break;
    }
    case "prompt_accepted": {
      stats.promptsAccepted.push(data.prompt);
      mine.pendingPrompts.push(logPrompt(`accepted: "${data.prompt}" (waiting for the next chunk to start)`));
      break;
    }
    case "prompt_applied": {
      stats.promptsApplied.push({ chunk: data.chunk, prompt: data.prompt });
      const item = mine.pendingPrompts.shift();
      const text = `applied to chunk ${data.chunk}: "${data.prompt}"`;
      if (item) {
        item.textContent = text;
        item.className = "applied";
      } else {
        logPrompt(text, "applied");
      }
      ensureChunks(data.chunk + 1);
      for (let i = data.chunk; i < mine.chunks.length; i++) {
        if (mine.chunks[i].state !== "done") {
          mine.chunks[i].prompt = data.prompt;
          mine.chunks[i].changed = true;
        }
      }
      renderChunks();
      break;
    }
    case "done":
      mine.finished = true;
      mine.job = data.video;
      stats.done = true;
      stats.doneSeconds = (performance.now() - stats.startedAt) / 1000;
      mine.player.end();
      $("progress").value = 100;
      $("progress-text").textContent = "100%";
      setStatus(`Job ${data.video.id}: ${data.video.status}.`);
      if (data.video.status === "failed" && data.video.error) showError(`the job failed: ${data.video.error.message}`);
      for (const c of mine.chunks) if (c.state !== "done") c.state = data.video.status === "completed" ? "done" : data.video.status;
      renderChunks();
      break;
    case "prompt_rejected": {
      const item = mine.pendingPrompts.pop(); // never accepted: nothing of it is pending
      if (item) item.remove();
      const why = (data.error && data.error.message) || "rejected";
      logPrompt(`rejected: "${data.prompt}" (${why})`, "rejected");
      showError(`the prompt was not taken: ${why}`);
      break;
    }
    case "error": {
      const code = data.error && data.error.code;
      const message = (data.error && data.error.message) || "unknown error";
      if (mine.job && code === "invalid_message" && !data.video) {
        showError(`the server did not understand a message: ${message}`); // the job goes on
        break;
      }
      mine.finished = true;
      mine.player.end();
      if (mine.cancelRequested && code === "cancelled") {
        stats.cancelled = true;
        setStatus(`Job ${mine.job ? mine.job.id : ""}: cancelled.`);
        for (const c of mine.chunks) if (c.state !== "done") c.state = "cancelled";
      } else {
        stats.error = message;
        showError(`the server reported an error${code ? ` (${code})` : ""}: ${message}`);
        setStatus("Failed.");
        for (const c of mine.chunks) if (c.state !== "done") c.state = "failed";
      }
      renderChunks();
      break;
    }
    default:
      break; // a newer server's message: nothing to show for it
  }
}

function sendPrompt(event) {
  event.preventDefault();
  const prompt = $("next-prompt").value.trim();
  if (!prompt) return;
  if (!session || !session.ws || session.ws.readyState !== WebSocket.OPEN) {
    showError("no video is being generated: the prompt has nowhere to go");
    return;
  }
  session.ws.send(JSON.stringify({ type: "prompt", prompt }));
  $("next-prompt").value = "";
}

function cancelJob() {
  if (session && session.ws && session.ws.readyState === WebSocket.OPEN) {
    session.ws.send(JSON.stringify({ type: "cancel" }));
    session.cancelRequested = true;
    setStatus("Cancelling…");
  }
}

function endSession() {
  const old = session;
  session = null;
  if (old.ws && old.ws.readyState <= WebSocket.OPEN) old.ws.close();
  old.player.close();
}

// ------------------------------------------------------------------------------------- stored videos

// Streams a stored or running job's mp4 (GET .../content?stream=true) into the video element.
async function watchJob(id) {
  clearError();
  if (session) endSession();
  const stats = newStats();
  window.magiStats = stats;
  const video = $("video");
  const player = new MsePlayer(video, { onError: showError, onCodec: (mime) => (stats.codec = mime) });
  session = { request: { prompt: "" }, player, stats, chunks: [], pendingPrompts: [], finished: false, ws: null };
  renderChunks();
  $("prompt-log").replaceChildren();
  watchFrames(video, stats);
  setStatus(`Streaming ${id}…`);
  try {
    const response = await api(`v1/videos/${encodeURIComponent(id)}/content?stream=true`);
    const reader = response.body.getReader();
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      stats.bytesReceived += value.byteLength;
      player.push(value);
    }
    player.end();
    setStatus(`Streamed ${id}.`);
  } catch (e) {
    showError(e.message);
  }
}

// A link cannot send the Authorization header: with a key it goes in the query (the server takes ?api_key=).
function contentUrl(id) {
  const key = apiKey();
  return `v1/videos/${encodeURIComponent(id)}/content` + (key ? `?api_key=${encodeURIComponent(key)}` : "");
}

function jobRow(job) {
  const row = document.createElement("tr");
  row.id = `job-${job.id}`;
  row.dataset.status = job.status;
  const cell = (text) => {
    const td = document.createElement("td");
    td.textContent = text;
    row.append(td);
    return td;
  };
  cell(job.id);
  cell(job.status === "in_progress" || job.status === "queued" ? `${job.status} ${job.progress || 0}%` : job.status);
  cell(job.created_at ? new Date(job.created_at * 1000).toLocaleString() : "");
  const prompts = Array.isArray(job.prompts) && job.prompts.length ? job.prompts : [job.prompt || ""];
  cell([...new Set(prompts)].join(" → ")).className = "prompt";
  const links = cell("");
  if (job.status === "completed") {
    const a = document.createElement("a");
    a.href = contentUrl(job.id);
    a.textContent = "mp4";
    a.className = "content-link";
    links.append(a, " ");
  }
  if (job.status !== "failed") {
    const watch = document.createElement("button");
    watch.type = "button";
    watch.textContent = "Play";
    watch.setAttribute("aria-label", `Play ${job.id}`);
    watch.addEventListener("click", () => watchJob(job.id));
    links.append(watch);
  }
  if (job.status === "failed" && job.error) links.textContent = job.error.message;
  return row;
}

async function loadJobs() {
  try {
    const list = await (await api("v1/videos?limit=50&order=desc")).json();
    $("jobs-body").replaceChildren(...list.data.map(jobRow));
  } catch (e) {
    showError(e.message);
  }
}

// ------------------------------------------------------------------------------------------------ wiring

$("api-key").value = sessionStorage.getItem("magi-api-key") || "";
$("api-key").addEventListener("change", () => {
  sessionStorage.setItem("magi-api-key", apiKey());
  loadServerInfo();
  loadJobs();
});
$("error-dismiss").addEventListener("click", clearError);
// The element keeps the video's own shape (a 64x64 test model or a 16:9 release) once its size is known.
$("video").addEventListener("loadedmetadata", (e) => {
  const v = e.target;
  if (v.videoWidth && v.videoHeight) v.style.aspectRatio = `${v.videoWidth} / ${v.videoHeight}`;
});
$("create-form").addEventListener("submit", startJob);
$("next-prompt-form").addEventListener("submit", sendPrompt);
$("cancel").addEventListener("click", cancelJob);
$("refresh-jobs").addEventListener("click", loadJobs);
for (const id of ["num-chunks", "num-frames"]) $(id).addEventListener("input", updateFramesHint);
loadServerInfo();
loadJobs();
