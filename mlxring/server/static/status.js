// The status page: polls GET v1/status, draws the ring, the figures, the chart and the
// events, and streams chat replies from v1/chat/completions. No library, no build step.
// Everything the server sends is put in with textContent or SVG attributes, never as HTML.
"use strict";

const POLL_MS = 1500;
const KEY = "mlxring.apiKey";
const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);

let model = null; // the served model's name, from the status
let polling = null; // the next poll's timer
let waitingForKey = false;
let lastStatus = null;
let busy = false; // a chat reply is streaming
const conversation = []; // the chat's messages so far

// ---- the key ------------------------------------------------------------------------
function authHeaders() {
  const key = sessionStorage.getItem(KEY);
  return key ? { authorization: `Bearer ${key}` } : {};
}

function askForKey(message) {
  sessionStorage.removeItem(KEY);
  waitingForKey = true;
  $("key-error").textContent = message || "";
  const dialog = $("key-dialog");
  if (!dialog.open) dialog.showModal();
  $("key-input").focus();
}

$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const key = $("key-input").value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY, key);
  $("key-input").value = "";
  $("key-dialog").close();
  waitingForKey = false;
  poll();
});
$("key-dialog").addEventListener("cancel", (e) => e.preventDefault()); // Esc: the key is needed

// ---- polling --------------------------------------------------------------------------
async function poll() {
  clearTimeout(polling);
  try {
    const res = await fetch("v1/status", { headers: authHeaders(), cache: "no-store" });
    if (res.status === 401) {
      const had = sessionStorage.getItem(KEY);
      askForKey(had ? "The server refused that key." : "");
      return; // polling resumes once a key is given
    }
    if (!res.ok) {
      const body = await res.json().catch(() => ({}));
      trouble(`The server answered ${res.status}: ${body.error?.message || res.statusText}.`);
    } else {
      render(await res.json());
    }
  } catch (err) {
    trouble(`Cannot reach the server (${err.message || err}). Retrying.`);
  }
  if (!waitingForKey) polling = setTimeout(poll, POLL_MS);
}

function trouble(message) {
  $("pill").dataset.state = "unreachable";
  $("pill-text").textContent = "no status";
  showBanner(message);
}

function showBanner(text) {
  const banner = $("banner");
  banner.hidden = !text;
  banner.textContent = text || "";
}

// ---- formatting -------------------------------------------------------------------------
function bytes(n) {
  if (n == null) return "–";
  for (const [unit, size] of [["GB", 2 ** 30], ["MB", 2 ** 20], ["KB", 2 ** 10]]) {
    if (n >= size) return `${(n / size).toFixed(1)} ${unit}`;
  }
  return `${n} B`;
}
const ms = (v) => (v == null ? "–" : v >= 1000 ? `${(v / 1000).toFixed(2)} s` : `${v.toFixed(v < 10 ? 2 : 1)} ms`);
const layerRange = (l) => (l ? `${l[0]}-${l[1]}` : "–"); // inclusive [first, last]
const clock = (t) => new Date(t * 1000).toLocaleTimeString([], { hour12: false });

// ---- rendering ----------------------------------------------------------------------------
function render(s) {
  lastStatus = s;
  model = s.model;
  const ok = s.status === "ok";
  $("model").textContent = s.model;
  $("pill").dataset.state = ok ? "ok" : "down";
  $("pill-text").textContent = ok ? "serving" : "ring down";
  $("updated").textContent = `updated ${clock(Date.now() / 1000)}`;
  showBanner(ok ? "" : `The ring is down: ${s.error || "no reason given"}. The launcher restarts it; the API answers 503 meanwhile.`);

  const t = s.throughput;
  $("tps").textContent = t.tokens_per_second.toFixed(1);
  $("tps-note").textContent = `last ${t.window_s} s`;
  $("ttft").textContent = ms(t.ttft_ms);
  $("itl").textContent = ms(t.itl_ms);
  $("running").textContent = s.live;
  $("waiting").textContent = s.waiting;
  const ring = s.ring;
  $("restarts").textContent = ring ? ring.restarts : "–";
  const failures = ring ? Object.values(ring.failures).reduce((a, b) => a + b, 0) : 0;
  $("failures-note").textContent = ring ? `${failures} failure${failures === 1 ? "" : "s"}` : "no launcher front";

  const layers = s.nodes.length ? s.nodes[s.nodes.length - 1].layers : null;
  $("ring-sub").textContent = `${s.nodes.length} node${s.nodes.length === 1 ? "" : "s"}` + (layers ? ` · ${layers[1] + 1} layers` : "");
  drawRing(s.nodes, ok && t.tokens_per_second > 0, ok, t.hop_ms);
  drawChart(s.history);
  drawEvents(ring);
  $("chat-send").disabled = !ok || busy;
}

function el(name, attrs = {}, parent = null, text = null) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text != null) node.textContent = text;
  if (parent) parent.appendChild(node);
  return node;
}

function drawRing(nodes, flowing, up, hopMs) {
  const svg = $("ring");
  svg.replaceChildren();
  svg.classList.toggle("flowing", flowing);
  svg.classList.toggle("down", !up);
  const n = nodes.length;
  if (!n) return;
  const W = 1000;
  const small = n > 4;
  const cw = small ? 240 : 290, ch = 152;
  const rx = n === 1 ? 0 : 340, ry = n === 1 ? 0 : n === 2 ? 108 : 175 + 25 * Math.max(0, n - 4);
  const H = Math.round(n === 2 ? 2 * ry + 84 : 2 * ry + ch + 24);
  const cx = W / 2, cy = H / 2;
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const start = n === 2 ? Math.PI : -Math.PI / 2; // the head on the left (2 nodes) or on top
  const angle = (i) => start + (2 * Math.PI * i) / n;
  const at = (a) => [cx + rx * Math.cos(a), cy + ry * Math.sin(a)];

  if (n > 1) {
    // the ring, drawn clockwise from angle 0, so that the moving dashes follow the data
    const d = `M ${cx + rx} ${cy} A ${rx} ${ry} 0 1 1 ${cx - rx} ${cy} A ${rx} ${ry} 0 1 1 ${cx + rx} ${cy}`;
    el("path", { d, class: "track" }, svg);
    el("path", { d, class: "flow" }, svg);
    for (let i = 0; i < n; i++) {
      const mid = (angle(i) + angle(i + 1)) / 2;
      const [x, y] = at(mid);
      const dir = (Math.atan2(ry * Math.cos(mid), -rx * Math.sin(mid)) * 180) / Math.PI;
      el("path", { d: "M -9 -8 L 9 0 L -9 8 Z", class: "arrow", transform: `translate(${x} ${y}) rotate(${dir})` }, svg);
      const label = hopMs == null ? "hop –" : `hop ≈ ${ms(hopMs)}`;
      const outward = Math.sin(mid) < 0 ? -24 : 24;
      const g = el("g", { class: "hop", transform: `translate(${x} ${y + outward})` }, svg);
      const w = 8 + label.length * 7.4;
      el("rect", { x: -w / 2, y: -12, width: w, height: 24, rx: 12 }, g);
      el("text", { x: 0, y: 5, "text-anchor": "middle" }, g, label);
    }
  }
  nodes.forEach((node, i) => {
    const [x, y] = at(angle(i));
    drawNode(svg, node, x - cw / 2, y - ch / 2, cw, ch);
  });
}

function drawNode(svg, node, x, y, w, h) {
  const g = el("g", { class: "node", "data-node": node.name, "data-state": node.state, transform: `translate(${x} ${y})` }, svg);
  el("rect", { class: "frame", width: w, height: h, rx: 12 }, g);
  el("circle", { class: `dot-${node.state}`, cx: 20, cy: 24, r: 5.5 }, g);
  el("text", { class: "name", x: 33, y: 30 }, g, node.name);
  const state = el("g", { class: "state", transform: `translate(${w - 14} 13)` }, g);
  const stateText = node.state.toUpperCase();
  const sw = 14 + stateText.length * 8;
  el("rect", { x: -sw, y: 0, width: sw, height: 20, rx: 10 }, state);
  el("text", { x: -sw / 2, y: 14.5, "text-anchor": "middle" }, state, stateText);

  const where = [node.host, node.backend && node.device ? `${node.backend}/${node.device}` : node.backend]
    .filter(Boolean)
    .join(" · ");
  el("text", { class: "meta", x: 14, y: 55 }, g, `${where}${where ? " · " : ""}rank ${node.rank}${node.rank === 0 ? " (head)" : ""}`);

  const badge = el("g", { class: "badge", transform: "translate(14 66)" }, g);
  const layerText = `layers ${layerRange(node.layers)}`;
  el("rect", { width: 16 + layerText.length * 7.6, height: 24, rx: 6 }, badge);
  el("text", { x: 8, y: 17 }, badge, layerText);
  const seqs = node.sequences == null ? "" : ` · ${node.sequences} seq`;
  el("text", { class: "figure", x: w - 14, y: 83, "text-anchor": "end" }, g, `step ${node.step_ms ? ms(node.step_ms) : "–"}${seqs}`);

  const bw = w - 28, by = 102;
  el("rect", { class: "bar-bg", x: 14, y: by, width: bw, height: 10, rx: 5 }, g);
  if (node.memory_bytes) {
    const part = (b) => (b ? Math.max(3, (bw * b) / node.memory_bytes) : 0);
    const wW = Math.min(bw, part(node.weight_bytes));
    const kW = Math.min(bw - wW, part(node.cache_bytes));
    if (wW) el("rect", { class: "bar-weights", x: 14, y: by, width: wW, height: 10, rx: 3 }, g);
    if (kW) el("rect", { class: "bar-kv", x: 14 + wW, y: by, width: kW, height: 10, rx: 3 }, g);
  }
  const used = `${bytes(node.weight_bytes)} weights · ${bytes(node.cache_bytes)} KV`;
  el("text", { class: "small", x: 14, y: by + 30 }, g, used);
  el("text", { class: "small", x: w - 14, y: by + 30, "text-anchor": "end" }, g, `of ${bytes(node.memory_bytes)}`);
}

function drawChart(history) {
  const canvas = $("chart");
  const dpr = window.devicePixelRatio || 1;
  const cssW = canvas.clientWidth, cssH = canvas.clientHeight;
  canvas.width = Math.round(cssW * dpr);
  canvas.height = Math.round(cssH * dpr);
  const ctx = canvas.getContext("2d");
  ctx.scale(dpr, dpr);
  ctx.clearRect(0, 0, cssW, cssH);
  const step = 5;
  const tokens = history.tokens;
  const points = [];
  for (let i = tokens.length % step; i + step <= tokens.length; i += step) {
    let sum = 0;
    for (let j = i; j < i + step; j++) sum += tokens[j];
    points.push(sum / step);
  }
  const left = 44, right = 8, top = 10, bottom = 22;
  const w = cssW - left - right, h = cssH - top - bottom;
  const peak = Math.max(1, ...points);
  const scale = niceMax(peak);
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = "#6b7280";
  ctx.strokeStyle = "#eef0f3";
  ctx.lineWidth = 1;
  for (let g = 0; g <= 2; g++) {
    const y = top + h - (h * g) / 2;
    ctx.beginPath();
    ctx.moveTo(left, y + 0.5);
    ctx.lineTo(left + w, y + 0.5);
    ctx.stroke();
    ctx.textAlign = "right";
    ctx.fillText(formatRate((scale * g) / 2), left - 6, y + 4);
  }
  ctx.textAlign = "left";
  ctx.fillText(`−${Math.round((points.length * step) / 60)} min`, left, cssH - 6);
  ctx.textAlign = "right";
  ctx.fillText("now", left + w, cssH - 6);
  if (points.length < 2) return;
  const x = (i) => left + (w * i) / (points.length - 1);
  const y = (v) => top + h - (h * v) / scale;
  ctx.beginPath();
  points.forEach((v, i) => (i ? ctx.lineTo(x(i), y(v)) : ctx.moveTo(x(i), y(v))));
  ctx.lineTo(x(points.length - 1), top + h);
  ctx.lineTo(x(0), top + h);
  ctx.closePath();
  const fill = ctx.createLinearGradient(0, top, 0, top + h);
  fill.addColorStop(0, "rgba(79, 70, 229, 0.28)");
  fill.addColorStop(1, "rgba(79, 70, 229, 0.02)");
  ctx.fillStyle = fill;
  ctx.fill();
  ctx.beginPath();
  points.forEach((v, i) => (i ? ctx.lineTo(x(i), y(v)) : ctx.moveTo(x(i), y(v))));
  ctx.strokeStyle = "#4f46e5";
  ctx.lineWidth = 2;
  ctx.lineJoin = "round";
  ctx.stroke();
}

function niceMax(v) {
  const p = 10 ** Math.floor(Math.log10(v));
  return [1, 2, 2.5, 5, 10].map((m) => m * p).find((m) => m >= v);
}
const formatRate = (v) => (v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1).replace(/\.0$/, "") : v.toFixed(2).replace(/\.?0+$/, ""));

function drawEvents(ring) {
  const list = $("events");
  list.replaceChildren();
  const add = (when, kind, message) => {
    const li = document.createElement("li");
    for (const [cls, text] of [["when", when], ["kind " + kind, kind], ["what", message]]) {
      const span = document.createElement("span");
      span.className = cls;
      span.textContent = text;
      li.appendChild(span);
    }
    list.appendChild(li);
  };
  if (!ring) {
    $("events-sub").textContent = "";
    const li = document.createElement("li");
    li.className = "none";
    li.textContent = "Restarts and failures are kept by the launcher (mlxring launch or serve); this head runs without one.";
    list.appendChild(li);
    return;
  }
  const repeated = ring.repeated.length ? ` · keeps failing: ${ring.repeated.join(", ")}` : "";
  $("events-sub").textContent = `${ring.restarts} restart${ring.restarts === 1 ? "" : "s"}${repeated}`;
  for (const e of ring.events) add(clock(e.time), e.kind, e.message);
  if (!ring.events.length) {
    const li = document.createElement("li");
    li.className = "none";
    li.textContent = "Nothing yet: no failure since the launcher started.";
    list.appendChild(li);
  }
}

// ---- chat -------------------------------------------------------------------------------------
function addMessage(role, text) {
  $("chat-empty")?.remove();
  const box = document.createElement("div");
  box.className = `msg ${role}`;
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = role === "user" ? "you" : role === "error" ? "error" : model || "model";
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  box.append(who, body);
  $("messages").appendChild(box);
  $("messages").scrollTop = $("messages").scrollHeight;
  return box;
}

async function send(text) {
  busy = true;
  $("chat-send").disabled = true;
  conversation.push({ role: "user", content: text });
  addMessage("user", text);
  const box = addMessage("assistant", "");
  box.dataset.done = "false";
  const out = box.querySelector(".text");
  let reply = "";
  try {
    const body = {
      model,
      messages: conversation,
      stream: true,
      temperature: Number($("chat-temp").value || 0),
      max_tokens: Number($("chat-max").value || 256),
    };
    const res = await fetch("v1/chat/completions", {
      method: "POST",
      headers: { "content-type": "application/json", ...authHeaders() },
      body: JSON.stringify(body),
    });
    if (res.status === 401) askForKey("The server refused that key.");
    if (!res.ok) {
      const err = await res.json().catch(() => ({}));
      throw new Error(err.error?.message || `HTTP ${res.status}`);
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let finished = false;
    while (!finished) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
      let cut;
      while (!finished && (cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") {
            finished = true;
            break;
          }
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          const delta = chunk.choices?.[0]?.delta?.content;
          if (delta) {
            reply += delta;
            out.textContent = reply;
            $("messages").scrollTop = $("messages").scrollHeight;
          }
        }
      }
    }
    conversation.push({ role: "assistant", content: reply });
  } catch (err) {
    conversation.pop(); // the question had no answer: leave it out of the next request
    addMessage("error", String(err.message || err));
  } finally {
    box.dataset.done = "true";
    busy = false;
    $("chat-send").disabled = lastStatus?.status !== "ok";
  }
}

$("chat-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("chat-input").value.trim();
  if (!text || busy || !model) return;
  $("chat-input").value = "";
  send(text);
});
$("chat-input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("chat-form").requestSubmit();
  }
});
$("chat-clear").addEventListener("click", () => {
  conversation.length = 0;
  $("messages").replaceChildren();
});
window.addEventListener("resize", () => lastStatus && drawChart(lastStatus.history));

poll();
