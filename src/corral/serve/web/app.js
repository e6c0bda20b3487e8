// The dashboard: a snapshot read once (/api/v1/status, /api/v1/deployments), then the event
// stream applied to it. Changes are gathered and drawn once per animation frame, so a
// thousand nodes reporting every second cost one repaint per frame, not one per message.
// The admin token travels as the HttpOnly cookie the login set; EventSource sends it.

import { Deployments } from "./deployments.js";
import { Detail } from "./detail.js";
import { when } from "./format.js";
import { Grid } from "./grid.js";

const $ = (id) => document.getElementById(id);
const nodes = new Map(); // name -> {node, state, phase, message, since, deployment, bytes, total, reason}
const changed = new Set();
let life = null; // how states follow from events (/dashboard/lifecycle.json)
let frame = 0;
let snapshotTime = null; // null while a snapshot is being read: messages wait in `early`
let early = [];
let source = null;

class SignedOut extends Error {}

async function api(path) {
  const answer = await fetch(path, { credentials: "same-origin", headers: { Accept: "application/json" } });
  if (answer.status === 401) {
    signedOut();
    throw new SignedOut("signed out");
  }
  if (!answer.ok) throw new Error(`${path}: HTTP ${answer.status}`);
  return answer.json();
}

function connection(state, text) {
  $("conn").dataset.state = state;
  $("conn-text").textContent = text;
}

function signedOut() {
  source?.close();
  connection("signed-out", "signed out: reload to sign in");
}

let grid = null; // made once the states are known

const deployments = new Deployments($("deployments"), {
  onOpen: (name) => openNode(name),
  reload: () => reloadDeployments(),
});

const detail = new Detail(
  { drawer: $("detail"), title: $("detail-title"), badge: $("detail-state"), body: $("detail-body"), close: $("detail-close") },
  { api, onClose: () => grid?.select(null) },
);

function openNode(name) {
  grid.select(name);
  detail.open(name);
}

function schedule() {
  if (!frame) frame = requestAnimationFrame(draw);
}

function draw() {
  frame = 0;
  grid.update(nodes, changed);
  changed.clear();
  deployments.render(Date.now());
}

function row(data) {
  return { ...data, since: when(data.since) };
}

// -- messages of the stream ------------------------------------------------------------

function applyEvent(e) {
  if (!e.node) return; // an unknown machine: it becomes a node when it is discovered
  let n = nodes.get(e.node);
  if (!n) {
    n = row({ node: e.node, state: "armed", phase: null, message: null, since: null, deployment: null, bytes: 0, total: 0, reason: null });
    nodes.set(e.node, n);
    grid.needsLayout = true;
  }
  const set = life.set_by[e.phase];
  const next = set ?? life.next[n.state]?.[e.phase];
  if (next === null) return; // history only: the node stays as it was (NodeStates.record)
  if (next !== undefined) n.state = next;
  if (!set) n.phase = e.phase;
  else if (set === "armed") n.phase = null;
  n.message = e.message;
  n.since = when(e.time);
  n.reason = e.phase === "failed" ? e.reason : null;
  changed.add(e.node);
  grid.failuresStale = true;
  detail.changed(e.node);
}

function applyProgress(p) {
  const n = nodes.get(p.node);
  if (n) {
    Object.assign(n, { deployment: p.deployment, bytes: p.bytes, total: p.total });
    changed.add(p.node);
  }
  if (!deployments.progress(p, Date.now())) reloadDeployments();
  detail.progress(p);
}

function receive(kind, data) {
  if (snapshotTime === null) {
    early.push([kind, data]);
    return;
  }
  if (kind === "event") applyEvent(data);
  else applyProgress(data);
  schedule();
}

// -- the snapshot ---------------------------------------------------------------------

async function loadSnapshot() {
  snapshotTime = null;
  const [status, list] = await Promise.all([api("/api/v1/status"), api("/api/v1/deployments")]);
  nodes.clear();
  for (const n of status.nodes) nodes.set(n.node, row(n));
  deployments.load(list);
  snapshotTime = Date.parse(status.time);
  const waiting = early;
  early = [];
  for (const [kind, data] of waiting) {
    // what the snapshot has already; progress is a level, it can be applied again
    if (kind === "event" && Date.parse(data.time) <= snapshotTime) continue;
    receive(kind, data);
  }
  grid.needsLayout = true;
  grid.failuresStale = true;
  schedule();
  if (detail.name) detail.changed(detail.name);
}

let reloading = 0;
function reloadDeployments() {
  if (reloading) return;
  reloading = setTimeout(async () => {
    try {
      deployments.load(await api("/api/v1/deployments"));
      schedule();
    } finally {
      reloading = 0;
    }
  }, 1000);
}

// -- the stream -----------------------------------------------------------------------

function connect() {
  let lost = false;
  source = new EventSource("/api/v1/events/stream");
  source.addEventListener("event", (m) => receive("event", JSON.parse(m.data)));
  source.addEventListener("progress", (m) => receive("progress", JSON.parse(m.data)));
  source.addEventListener("open", () => {
    connection("live", "live");
    if (lost) {
      lost = false;
      loadSnapshot().catch(report); // what happened while the stream was down
    }
  });
  source.addEventListener("error", () => {
    lost = true;
    connection("lost", "connection lost: reconnecting…");
    if (source.readyState === EventSource.CLOSED) {
      // the server refused the stream (not a dropped connection): ask why, retry
      api("/api/v1/status").then(() => setTimeout(connect, 3000), report);
    }
  });
}

function report(err) {
  if (!(err instanceof SignedOut)) connection("lost", `error: ${err.message}`);
}

async function start() {
  life = await api("/dashboard/lifecycle.json");
  grid = new Grid({
    grid: $("grid"),
    legend: $("legend"),
    empty: $("grid-empty"),
    count: $("node-count"),
    filter: $("filter"),
    failures: $("failures"),
    failureCount: $("failure-count"),
    states: life.states,
    onOpen: (name) => openNode(name),
  });
  grid.onChange = schedule;
  connect();
  await loadSnapshot();
  setInterval(() => {
    grid.refreshTimes(nodes);
    detail.refreshTimes();
  }, 30000);
  setInterval(() => deployments.render(Date.now()), 1000); // the chart scrolls on
}

start().catch(report);
