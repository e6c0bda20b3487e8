// Deployments: image, transport, kind and state; for the one opened, the nodes' progress
// and the aggregate throughput over time, summed from the progress messages.

import { ago, byName, bytes, clock, el, percent, rate, when } from "./format.js";
import { throughputChart } from "./chart.js";

const SHOWN = 8;
const WINDOW = 180; // seconds of throughput on the chart
const SMOOTH = 5; // seconds the rate is averaged over
const FINAL = new Set(["done", "failed", "cancelled"]);

class Tracked {
  constructor(dep) {
    this.dep = dep;
    this.members = new Map(dep.nodes.map((n) => [n.node, n]));
    this.seen = new Map(dep.nodes.map((n) => [n.node, n.bytes])); // bytes last heard of
    this.buckets = new Map(); // whole second -> bytes received in it
  }

  take(p, now) {
    const member = this.members.get(p.node);
    const before = this.seen.get(p.node) ?? 0;
    if (p.bytes > before) {
      const second = Math.floor(now / 1000);
      this.buckets.set(second, (this.buckets.get(second) ?? 0) + (p.bytes - before));
    }
    this.seen.set(p.node, p.bytes);
    if (member) Object.assign(member, { phase: p.phase, bytes: p.bytes, total: p.total, updated: Date.parse(p.time) / 1000 });
    return Boolean(member);
  }

  /** [second, bytes per second] over the window, averaged over SMOOTH seconds. */
  series(now) {
    const last = Math.floor(now / 1000);
    for (const second of this.buckets.keys()) if (second < last - WINDOW - SMOOTH) this.buckets.delete(second);
    const points = [];
    for (let s = last - WINDOW; s <= last; s += 1) {
      let sum = 0;
      for (let k = 0; k < SMOOTH; k += 1) sum += this.buckets.get(s - k) ?? 0;
      points.push([s, sum / SMOOTH]);
    }
    return points;
  }

  totals() {
    let done = 0, failed = 0, sent = 0, size = 0;
    for (const n of this.members.values()) {
      if (n.phase === "done") done += 1;
      if (n.phase === "failed" || n.phase === "cancelled") failed += 1;
      sent += n.bytes;
      size += n.total;
    }
    return { done, failed, active: this.members.size - done - failed, sent, size };
  }
}

export class Deployments {
  constructor(root, { onOpen, reload }) {
    this.root = root;
    this.onOpen = onOpen;
    this.reload = reload;
    this.tracked = new Map();
    this.open = null; // the id of the deployment shown in full
    this.chosenByUser = false;
    this.view = null;
    this.stale = true;
  }

  load(list) {
    const old = this.tracked;
    this.tracked = new Map();
    for (const dep of list) {
      const t = new Tracked(dep);
      const before = old.get(dep.id);
      if (before) t.buckets = before.buckets; // the chart survives a reload
      this.tracked.set(dep.id, t);
    }
    if (!this.chosenByUser || !this.tracked.has(this.open)) {
      const running = list.find((d) => d.state === "running");
      this.open = (running ?? list[0])?.id ?? null;
    }
    this.stale = true;
  }

  /** A progress message; false when its deployment is not known yet. */
  progress(p, now) {
    const t = this.tracked.get(p.deployment);
    if (!t || !t.take(p, now)) return false;
    if (FINAL.has(p.phase) && t.totals().active === 0) this.reload(); // its state changes
    t.dirty = true;
    return true;
  }

  render(now) {
    if (this.stale) this.build();
    const t = this.tracked.get(this.open);
    if (!t || !this.view) return;
    this.fill(t, now);
  }

  build() {
    this.stale = false;
    if (!this.tracked.size) {
      this.root.replaceChildren(el("p", "muted", "No deployment yet. corral deploy starts one."));
      this.view = null;
      return;
    }
    const boxes = [...this.tracked.values()].slice(0, SHOWN).map((t) => this.box(t));
    this.root.replaceChildren(...boxes);
  }

  box(t) {
    const d = t.dep;
    const box = el("article", "dep");
    const head = el("button", "dep-head");
    head.type = "button";
    head.setAttribute("aria-expanded", String(d.id === this.open));
    const image = d.image ?? "each node's image";
    head.append(el("span", "dep-id", `#${d.id}`), el("span", "dep-what", image), el("span", `state-tag ${d.state}`, d.state));
    const started = when(d.created);
    const finished = when(d.finished);
    const meta = `${d.kind} · ${d.transport} · ${d.nodes.length} node${d.nodes.length === 1 ? "" : "s"} (${d.noderange}) · `
      + (finished ? `finished ${clock(finished)}` : `started ${clock(started)}, ${ago(started)}`);
    head.append(el("span", "dep-meta", meta));
    head.addEventListener("click", () => {
      this.open = this.open === d.id ? null : d.id;
      this.chosenByUser = true;
      this.stale = true;
      this.render(Date.now());
    });
    box.append(head);
    if (d.id === this.open) box.append(this.body(t));
    return box;
  }

  body(t) {
    const body = el("div", "dep-body");
    const meter = el("div", "meter");
    const fill = el("span");
    meter.append(fill);
    const stats = el("div", "stats");
    const labels = [];
    const stat = (k) => {
      const box = el("div", "stat");
      const v = el("div", "v", "–");
      const label = el("div", "k", k);
      labels.push(label);
      box.append(v, label);
      stats.append(box);
      return v;
    };
    const view = { fill, progress: stat("transferred"), rate: stat("throughput now"), nodes: stat("nodes done / failed / active") };
    view.progressOf = labels[0];
    const chart = throughputChart();
    const note = el("p", "chart-note", "Aggregate throughput of all its nodes, last 3 minutes (heard since this page opened).");
    const members = el("div", "members");
    members.addEventListener("click", (e) => {
      const row = e.target.closest(".member");
      if (row) this.onOpen(row.dataset.node);
    });
    view.rows = new Map();
    for (const n of [...t.members.values()].sort((a, b) => byName(a.node, b.node))) {
      const row = el("div", "member");
      row.dataset.node = n.node;
      const bar = el("div", "meter");
      const barFill = el("span");
      bar.append(barFill);
      const phase = el("span", "p");
      const pct = el("span", "pct");
      row.append(el("span", "n", n.node), phase, bar, pct);
      view.rows.set(n.node, { row, phase, barFill, pct });
    }
    members.append(...[...view.rows.values()].map((r) => r.row));
    Object.assign(view, { chart, id: t.dep.id });
    this.view = view;
    t.dirty = true;
    body.append(meter, stats, chart.svg, note, members);
    return body;
  }

  fill(t, now) {
    const v = this.view;
    const sums = t.totals();
    const pct = percent(sums.sent, sums.size);
    v.fill.style.width = `${pct ?? 0}%`;
    v.progress.textContent = bytes(sums.sent);
    v.progressOf.textContent = sums.size ? `transferred of ${bytes(sums.size)}` : "transferred";
    const series = t.series(now);
    v.rate.textContent = rate(series[series.length - 1][1]);
    v.nodes.textContent = `${sums.done} / ${sums.failed} / ${sums.active}`;
    v.chart.draw(series);
    if (!t.dirty) return;
    t.dirty = false;
    for (const [name, r] of v.rows) {
      const n = t.members.get(name);
      const p = percent(n.bytes, n.total);
      r.phase.textContent = n.phase;
      r.barFill.style.width = `${n.phase === "done" ? 100 : p ?? 0}%`;
      r.pct.textContent = n.phase === "done" ? "100%" : p === null ? "" : `${p}%`;
      r.row.className = `member ${n.phase}`;
      r.row.title = `${name}: ${n.phase}${n.message ? ` — ${n.message}` : ""}`;
    }
  }
}
