// The node grid: one cell per node, coloured and patterned by state, a legend with the
// count of each state, and the list of failures. Cells are made once and changed in place.

import { ago, byName, clock, el, percent } from "./format.js";
import { nodeFilter } from "./noderange.js";

/** Up to this many nodes, a cell shows the node's name and phase. */
const NAMED = 48;
/** Up to this many, bigger cells; past it, small ones (1,000 fit in one screen). */
const MEDIUM = 500;
const FAILURES_SHOWN = 100;

const LABELS = {
  failed: "failed",
  installing: "installing",
  booting: "booting",
  deployed: "deployed",
  armed: "armed",
  discovered: "discovered",
  installed: "installed",
  running: "running",
};

export class Grid {
  constructor({ grid, legend, empty, count, filter, failures, failureCount, states, onOpen }) {
    Object.assign(this, { gridEl: grid, legendEl: legend, emptyEl: empty, countEl: count });
    Object.assign(this, { filterEl: filter, failuresEl: failures, failureCountEl: failureCount });
    this.states = states;
    this.onOpen = onOpen;
    this.cells = new Map(); // node name -> cell element
    this.chosen = new Set(); // states picked in the legend
    this.test = null;
    this.selected = null;
    this.chips = new Map();
    for (const state of states) {
      const chip = el("button", "chip");
      chip.type = "button";
      chip.dataset.state = state;
      chip.setAttribute("aria-pressed", "false");
      chip.append(el("span", `swatch s-${state}`), el("span", "label", LABELS[state] ?? state), el("span", "n", "0"));
      chip.addEventListener("click", () => this.toggle(state));
      this.chips.set(state, chip);
      legend.append(chip);
    }
    filter.addEventListener("input", () => {
      this.test = nodeFilter(filter.value, states);
      this.needsLayout = true;
      this.onChange();
    });
    this.gridEl.addEventListener("click", (e) => {
      const cell = e.target.closest(".cell");
      if (cell) onOpen(cell.dataset.node);
    });
    this.failuresEl.addEventListener("click", (e) => {
      const item = e.target.closest("li[data-node]");
      if (item) onOpen(item.dataset.node);
    });
    this.needsLayout = true;
    this.onChange = () => {};
  }

  toggle(state) {
    if (this.chosen.has(state)) this.chosen.delete(state);
    else this.chosen.add(state);
    this.chips.get(state).setAttribute("aria-pressed", String(this.chosen.has(state)));
    this.needsLayout = true;
    this.onChange();
  }

  shows(row) {
    return (!this.chosen.size || this.chosen.has(row.state)) && (!this.test || this.test(row));
  }

  select(name) {
    this.cells.get(this.selected)?.classList.remove("selected");
    this.selected = name;
    this.cells.get(name)?.classList.add("selected");
  }

  /** Build the cells again: after a snapshot, a new node, or a change of filter. */
  layout(nodes) {
    this.needsLayout = false;
    const rows = [...nodes.values()].filter((row) => this.shows(row)).sort((a, b) => byName(a.node, b.node));
    const named = nodes.size <= NAMED;
    this.gridEl.classList.toggle("named", named);
    this.gridEl.classList.toggle("medium", !named && nodes.size <= MEDIUM);
    this.cells.clear();
    const cells = rows.map((row) => {
      const cell = el("button", "cell");
      cell.type = "button";
      cell.dataset.node = row.node;
      cell.setAttribute("role", "listitem");
      if (named) cell.append(el("span", "stripe"), el("span", "name", row.node), el("span", "what"), el("span", "fill"));
      else cell.append(el("span", "todo"));
      this.cells.set(row.node, cell);
      this.paint(cell, row, named);
      return cell;
    });
    this.gridEl.replaceChildren(...cells);
    this.select(this.selected);
    this.emptyEl.hidden = rows.length > 0 || nodes.size === 0;
    this.countEl.textContent = rows.length === nodes.size ? `${nodes.size}` : `${rows.length} of ${nodes.size}`;
  }

  paint(cell, row, named = this.gridEl.classList.contains("named")) {
    const pct = percent(row.bytes, row.total);
    const active = row.state === "installing" || row.state === "booting";
    cell.className = `cell s-${row.state}${row.node === this.selected ? " selected" : ""}`;
    const settled = row.state === "installed" || row.state === "running" || row.state === "discovered";
    const what = row.state === "failed" ? row.reason || "failed" : settled ? row.state : row.phase || row.state;
    const lines = [`${row.node}: ${row.state}`];
    if (row.phase) lines.push(`phase: ${row.phase}${active && pct !== null ? ` (${pct}%)` : ""}`);
    if (row.reason) lines.push(`reason: ${row.reason}`);
    if (row.message) lines.push(row.message);
    if (row.since) lines.push(`since ${clock(row.since)} (${ago(row.since)})`);
    cell.title = lines.join("\n");
    cell.setAttribute("aria-label", lines.join(", "));
    if (named) {
      cell.querySelector(".what").textContent = active && pct !== null ? `${what} · ${pct}%` : what;
      cell.querySelector(".fill").style.width = active && pct !== null ? `${pct}%` : "0";
    } else {
      cell.firstChild.style.height = active && pct !== null ? `${100 - pct}%` : "0";
    }
  }

  /** Apply what changed since the last frame. */
  update(nodes, changed) {
    if (this.needsLayout) {
      this.layout(nodes);
    } else {
      for (const name of changed) {
        const row = nodes.get(name);
        const cell = this.cells.get(name);
        if (!row) continue;
        if (Boolean(cell) !== this.shows(row)) {
          this.layout(nodes); // a filtered state changed: the set of cells did
          break;
        }
        if (cell) this.paint(cell, row);
      }
    }
    this.legend(nodes);
    if (this.failuresStale) this.listFailures(nodes);
  }

  legend(nodes) {
    const counts = new Map(this.states.map((s) => [s, 0]));
    for (const row of nodes.values()) counts.set(row.state, (counts.get(row.state) ?? 0) + 1);
    for (const [state, chip] of this.chips) {
      const n = counts.get(state) ?? 0;
      chip.querySelector(".n").textContent = n.toLocaleString();
      chip.classList.toggle("zero", n === 0);
      chip.title = `${n} ${LABELS[state] ?? state}: click to show only these`;
    }
  }

  listFailures(nodes) {
    this.failuresStale = false;
    const failed = [...nodes.values()].filter((row) => row.state === "failed");
    failed.sort((a, b) => (b.since?.getTime() ?? 0) - (a.since?.getTime() ?? 0));
    this.failureCountEl.textContent = failed.length ? String(failed.length) : "";
    if (!failed.length) {
      const none = el("li", "none", "No failed node.");
      this.failuresEl.replaceChildren(none);
      return;
    }
    const items = failed.slice(0, FAILURES_SHOWN).map((row) => {
      const item = el("li");
      item.dataset.node = row.node;
      item.title = row.message || "";
      item.append(el("span", "who", row.node), el("span", "reason", row.reason || "failed"));
      item.append(el("span", "why", row.message || ""), el("span", "when", ago(row.since)));
      return item;
    });
    if (failed.length > FAILURES_SHOWN) items.push(el("li", "none", `and ${failed.length - FAILURES_SHOWN} more`));
    this.failuresEl.replaceChildren(...items);
  }

  /** Times in tooltips and the failure list grow old: repaint them now and then. */
  refreshTimes(nodes) {
    for (const [name, cell] of this.cells) this.paint(cell, nodes.get(name));
    this.listFailures(nodes);
  }
}
