// MQTT.js (the npm `mqtt` package, what browsers use) round trips through our broker over
// WebSockets: node tests/mqttjs_roundtrip.js URL VERSION  (VERSION 4 = MQTT 3.1.1, 5 = MQTT 5).
// For each QoS 0, 1, 2: one client subscribes at that QoS, another publishes at it; prints one
// JSON line per QoS with what came back, then exits 0 (1 on a timeout or an error).
"use strict";
const mqtt = require("mqtt");

const [url, version] = process.argv.slice(2);
const protocolVersion = Number(version);
const deadline = setTimeout(() => { console.error("timed out"); process.exit(1); }, 15000);

function connected(id) {
  return new Promise((resolve, reject) => {
    const c = mqtt.connect(url, { protocolVersion, clientId: id, reconnectPeriod: 0, connectTimeout: 5000 });
    c.once("connect", () => resolve(c));
    c.once("error", reject);
  });
}

async function main() {
  for (const qos of [0, 1, 2]) {
    const topic = `mqttjs/${protocolVersion}/${qos}`;
    const sub = await connected(`js-sub-${protocolVersion}-${qos}`);
    const pub = await connected(`js-pub-${protocolVersion}-${qos}`);
    const granted = await new Promise((resolve, reject) =>
      sub.subscribe(topic, { qos }, (err, g) => (err ? reject(err) : resolve(g[0].qos))));
    const payload = Buffer.from([0, 1, 2, 255, qos]);
    const got = new Promise((resolve) => sub.once("message", (t, p, packet) =>
      resolve({ topic: t, payload: [...p], qos: packet.qos })));
    await new Promise((resolve, reject) => pub.publish(topic, payload, { qos }, (err) => (err ? reject(err) : resolve())));
    const message = await got;
    console.log(JSON.stringify({ version: protocolVersion, qos, granted, ...message }));
    await new Promise((resolve) => pub.end(false, {}, resolve));
    await new Promise((resolve) => sub.end(false, {}, resolve));
  }
  clearTimeout(deadline);
}

main().catch((err) => { console.error(String(err)); process.exit(1); });
