// The live page: an MQTT 5 client over WebSockets (MQTT.js), the fourth client of mqtt-pingpong.
// It pings through the running echo_client once a second with MQTT 5 request/response (its own
// response topic, the sequence number as correlation data) and draws the round trips; it shows
// the ping_client's traffic on /ping and /pong, and the broker's $SYS figures. Nothing here is
// fetched from the internet: MQTT.js comes from the broker (/mqtt.min.js, `make web`).
"use strict";

const PING = "/ping";
const PONG = "/pong";
const WINDOW_MS = 120000; // the chart's width in time
const LOST_AFTER_MS = 5000; // a ping unanswered this long is lost
const TRAFFIC_LINES = 12;

const $ = (id) => document.getElementById(id);
const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/mqtt`;
const clientId = `page-${Math.random().toString(16).slice(2, 10)}`;
const responseTopic = `pingpong/page/${clientId}/pong`;

// What the page has seen, also read by the browser test (tests/test_live_page.py).
const state = {
  connected: false,
  sent: 0,
  rtts: [], // {at, ms}: at is Date.now() when the ping was sent
  lost: [], // at
  outages: [], // {start, end|null}
  pending: new Map(), // seq -> {at, t0}
  ownPayloads: new Set(),
  pingClientSeen: new Map(), // payload -> time it was seen on /ping
  sys: {},
};
window.pingpong = state;

function setStatus(kind, text) {
  const el = $("status");
  el.dataset.state = kind;
  el.textContent = text;
}

function clock(ms) {
  const d = new Date(ms);
  return d.toLocaleTimeString("en-GB", { hour12: false }) + "." + String(d.getMilliseconds()).padStart(3, "0");
}

function quantile(sorted, q) {
  if (!sorted.length) return null;
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1));
  return sorted[i];
}

function ms(v) {
  return v === null || v === undefined ? "–" : `${v < 10 ? v.toFixed(2) : v.toFixed(1)} ms`;
}

function showFigures() {
  const now = Date.now();
  const recent = state.rtts.filter((r) => r.at > now - WINDOW_MS).map((r) => r.ms).sort((a, b) => a - b);
  const last = state.rtts.length ? state.rtts[state.rtts.length - 1].ms : null;
  $("rtt-last").textContent = ms(last);
  $("rtt-p50").textContent = ms(quantile(recent, 0.5));
  $("rtt-p90").textContent = ms(quantile(recent, 0.9));
  $("rtt-p99").textContent = ms(quantile(recent, 0.99));
  $("sent").textContent = state.sent;
  $("answered").textContent = state.rtts.length;
  $("lost").textContent = state.lost.length;
  $("outages").textContent = state.outages.length;
}

function draw() {
  const canvas = $("chart");
  const g = canvas.getContext("2d");
  const w = canvas.width;
  const h = canvas.height;
  const pad = { left: 56, right: 10, top: 10, bottom: 22 };
  const now = Date.now();
  const t0 = now - WINDOW_MS;
  const x = (t) => pad.left + ((t - t0) / WINDOW_MS) * (w - pad.left - pad.right);
  const visible = state.rtts.filter((r) => r.at >= t0);
  const top = Math.max(1, ...visible.map((r) => r.ms)) * 1.15;
  const y = (v) => h - pad.bottom - (v / top) * (h - pad.top - pad.bottom);
  g.clearRect(0, 0, w, h);
  // Time without a connection, shaded.
  g.fillStyle = "#e6e8ee";
  for (const o of state.outages) {
    const a = Math.max(o.start, t0);
    const b = o.end === null ? now : o.end;
    if (b >= t0) g.fillRect(x(a), pad.top, Math.max(2, x(b) - x(a)), h - pad.top - pad.bottom);
  }
  // Axes and gridlines.
  g.strokeStyle = "#dde1ea";
  g.fillStyle = "#6b7385";
  g.font = "11px system-ui, sans-serif";
  for (let i = 0; i <= 4; i++) {
    const v = (top / 4) * i;
    g.beginPath();
    g.moveTo(pad.left, y(v));
    g.lineTo(w - pad.right, y(v));
    g.stroke();
    g.fillText(`${v < 10 ? v.toFixed(1) : v.toFixed(0)} ms`, 4, y(v) + 4);
  }
  for (let s = 0; s <= WINDOW_MS / 1000; s += 30) {
    g.fillText(s === 0 ? "now" : `-${s} s`, x(now - s * 1000) - 12, h - 6);
  }
  // Lost pings: red ticks where they were sent.
  g.strokeStyle = "#d1242f";
  g.lineWidth = 2;
  for (const at of state.lost) {
    if (at < t0) continue;
    g.beginPath();
    g.moveTo(x(at), pad.top);
    g.lineTo(x(at), h - pad.bottom);
    g.stroke();
  }
  // Round trips: a line through the points, and the points.
  g.strokeStyle = "#1f6feb";
  g.lineWidth = 1.5;
  g.beginPath();
  visible.forEach((r, i) => (i ? g.lineTo(x(r.at), y(r.ms)) : g.moveTo(x(r.at), y(r.ms))));
  g.stroke();
  g.fillStyle = "#1f6feb";
  for (const r of visible) {
    g.beginPath();
    g.arc(x(r.at), y(r.ms), 2.5, 0, 2 * Math.PI);
    g.fill();
  }
}

function traffic(topic, payload, note) {
  const li = document.createElement("li");
  li.className = topic === PONG ? "pong" : "ping";
  li.textContent = `${clock(Date.now())}  ${topic.padEnd(5)}  b'${payload}'${note ? "  " + note : ""}`;
  const list = $("traffic");
  list.prepend(li);
  while (list.children.length > TRAFFIC_LINES) list.lastChild.remove();
}

function onSys(topic, text) {
  const name = topic.slice("$SYS/broker/".length);
  const now = Date.now();
  const previous = state.sys[name];
  state.sys[name] = { value: text, at: now };
  const rate = (id) => {
    if (previous && now > previous.at) {
      const perSecond = ((Number(text) - Number(previous.value)) * 1000) / (now - previous.at);
      if (Number.isFinite(perSecond) && perSecond >= 0) $(id).textContent = perSecond.toFixed(1);
    }
  };
  if (name === "clients/connected") $("sys-clients").textContent = text;
  else if (name === "messages/received") rate("sys-received");
  else if (name === "messages/sent") rate("sys-sent");
  else if (name === "messages/dropped") $("sys-dropped").textContent = text;
  else if (name === "heap/current") $("sys-memory").textContent = `${(Number(text) / 1048576).toFixed(1)} MiB`;
  else if (name === "uptime") $("sys-uptime").textContent = text;
}

function start() {
  $("url").textContent = url;
  if (typeof mqtt === "undefined") {
    setStatus("missing", "MQTT.js is not installed next to the page: run `make web` (it needs npm), then reload.");
    return;
  }
  setStatus("starting", `Connecting to ${url}…`);
  const client = mqtt.connect(url, {
    protocolVersion: 5,
    clientId,
    clean: true,
    keepalive: 10,
    reconnectPeriod: 1000,
    connectTimeout: 4000,
  });
  const decoder = new TextDecoder();
  let seq = 0;

  client.on("connect", () => {
    state.connected = true;
    const open = state.outages[state.outages.length - 1];
    let note = "";
    if (open && open.end === null) {
      open.end = Date.now();
      note = ` Back after ${((open.end - open.start) / 1000).toFixed(1)} s without the broker.`;
    }
    setStatus("up", `Connected to ${url} (MQTT 5) as ${clientId}.${note}`);
    showFigures();
    client.subscribe([responseTopic, PING, PONG, "$SYS/broker/#"], { qos: 0 });
  });
  const down = () => {
    if (!state.connected) return; // one outage per lost connection, however it is reported
    state.connected = false;
    const since = Date.now();
    state.outages.push({ start: since, end: null });
    setStatus("down", `No connection to the broker since ${clock(since)}: reconnecting every second…`);
    showFigures();
  };
  client.on("close", down);
  client.on("offline", down);
  client.on("error", (err) => { if (!state.connected) setStatus("down", `Cannot connect to ${url}: ${err.message}`); });

  client.on("message", (topic, payload, packet) => {
    const text = decoder.decode(payload);
    if (topic === responseTopic) {
      const data = packet.properties && packet.properties.correlationData;
      const key = data ? Number(decoder.decode(data)) : NaN;
      const sent = state.pending.get(key);
      if (sent) {
        state.pending.delete(key);
        state.rtts.push({ at: sent.at, ms: performance.now() - sent.t0 });
        if (state.rtts.length > 10000) state.rtts.shift();
      }
    } else if (topic === PING || topic === PONG) {
      if (state.ownPayloads.has(text)) return; // our own ping, on its way to the echo_client
      let note = "";
      if (topic === PING) {
        state.pingClientSeen.set(text, performance.now());
      } else if (state.pingClientSeen.has(text)) {
        note = `(${ms(performance.now() - state.pingClientSeen.get(text))} after its ping, as seen here)`;
        state.pingClientSeen.delete(text);
      }
      if (state.pingClientSeen.size > 100) state.pingClientSeen.clear();
      traffic(topic, text, note);
    } else if (topic.startsWith("$SYS/broker/")) {
      onSys(topic, text);
    }
  });

  setInterval(() => {
    const now = Date.now();
    for (const [key, sent] of state.pending) {
      if (now - sent.at > LOST_AFTER_MS) {
        state.pending.delete(key);
        state.lost.push(sent.at);
      }
    }
    if (state.connected) {
      seq += 1;
      const payload = (now / 1000).toFixed(3);
      state.ownPayloads.add(payload);
      if (state.ownPayloads.size > 50) state.ownPayloads.delete(state.ownPayloads.values().next().value);
      state.pending.set(seq, { at: now, t0: performance.now() });
      state.sent += 1;
      client.publish(PING, payload, {
        qos: 0,
        properties: { responseTopic, correlationData: new TextEncoder().encode(String(seq)) },
      });
    }
    showFigures();
  }, 1000);

  const frame = () => {
    draw();
    requestAnimationFrame(frame);
  };
  requestAnimationFrame(frame);
}

start();
