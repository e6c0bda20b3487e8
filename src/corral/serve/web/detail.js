// A node's detail, in a drawer: its state, last failure with the log tail, how long each
// phase took, its hardware, its inventory and its events. Read when opened, and again
// when the node has a new event; progress moves its bar in place.

import { ago, bytes, clock, duration, el, percent, when } from "./format.js";

// what corral did and served before the node's own software ran: drawn apart in the timeline
const BOOT_STEPS = new Set(["power", "dhcp", "loader", "boot-config", "kernel", "initrd"]);

function kv(pairs) {
  const list = el("dl", "kv");
  for (const [k, v] of pairs) {
    if (v === null || v === undefined || v === "") continue;
    list.append(el("dt", null, k), v instanceof Node ? wrap(v) : el("dd", null, String(v)));
  }
  return list;
}

function wrap(node) {
  const dd = el("dd");
  dd.append(node);
  return dd;
}

function table(rows, columns) {
  const t = el("table", "facts");
  const head = el("tr");
  for (const [, label] of columns) head.append(el("th", null, label));
  t.append(head);
  for (const row of rows) {
    const tr = el("tr");
    for (const [key, , show] of columns) tr.append(el("td", null, show ? show(row[key], row) : row[key] ?? ""));
    t.append(tr);
  }
  return t;
}

export class Detail {
  constructor({ drawer, title, badge, body, close }, { api, onClose }) {
    Object.assign(this, { drawer, title, badge, body, api, onClose });
    this.name = null;
    this.data = null;
    this.timer = 0;
    close.addEventListener("click", () => this.close());
    document.addEventListener("keydown", (e) => {
      if (e.key === "Escape" && this.name) this.close();
    });
  }

  async open(name) {
    this.name = name;
    this.data = null;
    this.title.textContent = name;
    this.badge.textContent = "";
    this.badge.className = "badge";
    this.body.replaceChildren(el("p", "muted", "Loading…"));
    this.drawer.hidden = false;
    await this.load();
  }

  close() {
    this.name = null;
    this.drawer.hidden = true;
    this.onClose();
  }

  /** The node had an event: read its detail again, once for a burst of them. */
  changed(name) {
    if (name !== this.name || this.timer) return;
    this.timer = setTimeout(() => {
      this.timer = 0;
      this.load();
    }, 250);
  }

  async load() {
    const name = this.name;
    try {
      const data = await this.api(`/api/v1/nodes/${encodeURIComponent(name)}/detail`);
      if (name !== this.name) return;
      this.data = data;
      this.fetched = Date.now();
      this.render();
    } catch (err) {
      if (name === this.name) this.body.replaceChildren(el("p", "muted", `Could not read ${name}: ${err.message}`));
    }
  }

  progress(p) {
    const d = this.data;
    if (!d || p.node !== this.name || !this.bar) return;
    d.deployment = { ...(d.deployment ?? {}), id: p.deployment, phase: p.phase, bytes: p.bytes, total: p.total };
    this.paintProgress();
  }

  paintProgress() {
    const dep = this.data.deployment;
    const pct = percent(dep.bytes, dep.total);
    this.bar.style.width = `${dep.phase === "done" ? 100 : pct ?? 0}%`;
    this.barText.textContent = `${dep.phase} · ${bytes(dep.bytes)}${dep.total ? ` of ${bytes(dep.total)}` : ""}${pct !== null ? ` (${pct}%)` : ""}`;
  }

  render() {
    const d = this.data;
    if (!d) return;
    this.badge.textContent = d.state;
    this.badge.className = `badge s-${d.state}`;
    const since = when(d.since);
    const parts = [
      kv([
        ["phase", d.phase ?? "—"],
        ["message", d.message],
        ["since", since ? `${clock(since)} (${ago(since)})` : null],
      ]),
    ];
    this.bar = null;
    if (d.deployment) {
      const dep = d.deployment;
      const meter = el("div", "meter");
      this.bar = el("span");
      meter.append(this.bar);
      this.barText = el("div", "muted");
      parts.push(el("h3", null, `Deployment #${dep.id}`), kv([["image", dep.image], ["transport", dep.transport]]), meter, this.barText);
      this.paintProgress();
    }
    if (d.failure) parts.push(this.failure(d.failure, d.state === "failed"));
    parts.push(el("h3", null, "Phase durations (latest boot or install)"), this.spans(d.durations));
    parts.push(el("h3", null, "Hardware (from discovery)"), this.hardware(d.facts));
    parts.push(el("h3", null, "Inventory"), this.inventory(d));
    parts.push(el("h3", null, `Events (newest first, ${d.events.length})`), this.timeline(d.events));
    const top = this.body.scrollTop; // a redraw must not move what the reader reads
    this.body.replaceChildren(...parts);
    this.body.scrollTop = top;
  }

  failure(f, current) {
    const box = el("div", "failure");
    const at = when(f.time);
    box.append(el("div", "title", current ? `Failed: ${f.reason ?? "unknown reason"}` : `Last failure (${f.reason ?? "unknown reason"}), since recovered`));
    box.append(kv([
      ["during", f.during],
      ["message", f.message],
      ["at", `${clock(at)} (${ago(at)})`],
      ["reported by", f.source],
    ]));
    if (f.log) box.append(el("div", "muted", "Last lines of the node's log"), el("pre", null, f.log));
    return box;
  }

  spans(spans) {
    if (!spans.length) return el("p", "muted", "No event yet.");
    const grow = (Date.now() - this.fetched) / 1000;
    const seconds = spans.map((s) => (s.seconds === null ? null : s.seconds + (s.open ? grow : 0)));
    const longest = Math.max(1, ...seconds.filter((s) => s !== null));
    const box = el("div", "spans");
    spans.forEach((s, i) => {
      const cls = s.open ? "open" : s.phase === "failed" ? "failed" : "";
      const label = el("span", cls, s.phase);
      const track = el("div", "track");
      const fill = el("span");
      fill.style.width = seconds[i] === null ? "0" : `${(100 * seconds[i]) / longest}%`;
      track.append(fill);
      const wrapTrack = el("div", cls);
      wrapTrack.append(track);
      const text = seconds[i] === null ? (s.phase === "failed" ? "ended" : "—") : `${duration(seconds[i])}${s.open ? " so far" : ""}`;
      const d = el("span", `d ${cls}`, text);
      d.title = `from ${clock(when(s.start))}`;
      box.append(label, wrapTrack, d);
    });
    return box;
  }

  hardware(facts) {
    if (!facts) return el("p", "muted", "None: the node was not discovered (it did not boot corral's discovery ramdisk).");
    const box = el("div");
    box.append(kv([
      ["CPUs", facts.cpus],
      ["memory", facts.memory_mb ? `${(facts.memory_mb / 1024).toFixed(1)} GiB` : null],
      ["vendor", [facts.vendor, facts.product].filter(Boolean).join(" ")],
      ["kernel", facts.kernel],
    ]));
    if (facts.disks?.length) {
      box.append(table(facts.disks, [
        ["name", "disk"],
        ["size_bytes", "size", (v) => (v ? bytes(v) : "")],
        ["model", "model"],
        ["rotational", "kind", (v) => (v === true ? "HDD" : v === false ? "SSD" : "")],
      ]));
    }
    if (facts.nics?.length) {
      box.append(table(facts.nics, [
        ["name", "NIC"],
        ["mac", "MAC"],
        ["carrier", "link", (v) => (v === true ? "up" : v === false ? "down" : "")],
        ["driver", "driver"],
      ]));
    }
    return box;
  }

  inventory(d) {
    const box = el("div");
    box.append(kv([["groups", d.groups.join(", ")], ["profiles", d.profiles.join(", ")]]));
    if (d.interfaces.length) box.append(table(d.interfaces, [["name", "interface"], ["mac", "MAC"], ["ip", "IPv4"], ["vlan", "VLAN"]]));
    return box;
  }

  timeline(events) {
    if (!events.length) return el("p", "muted", "No event stored.");
    const list = el("ol", "timeline");
    for (const e of [...events].reverse()) {
      const at = when(e.time);
      const item = el("li", e.phase === "failed" ? "failed" : BOOT_STEPS.has(e.phase) ? "boot" : "");
      const t = el("div", "t", `${clock(at)} · ${ago(at)}`);
      t.title = at.toString();
      const line = el("div");
      line.append(el("span", "ph", e.phase), document.createTextNode(e.message || ""));
      if (e.reason) line.append(el("span", "src", ` (${e.reason})`));
      item.append(t, line, el("div", "src", `from ${e.source}`));
      list.append(item);
    }
    return list;
  }

  /** Relative times and open phases grow: draw again from what was read. */
  refreshTimes() {
    if (this.data) this.render();
  }
}
