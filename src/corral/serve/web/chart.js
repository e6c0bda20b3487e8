// A throughput chart in hand-written SVG: an area under a line, a few ticks.

import { rate } from "./format.js";

const NS = "http://www.w3.org/2000/svg";
const W = 400, H = 130, LEFT = 64, BOTTOM = 18, TOP = 8;
const clock = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

/** A round top for the y axis: 1, 2 or 5 times a power of ten. */
function roundUp(value) {
  if (value <= 0) return 1e6;
  const power = 10 ** Math.floor(Math.log10(value));
  return [1, 2, 5, 10].map((f) => f * power).find((v) => v >= value);
}

export function throughputChart() {
  const root = svg("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "aggregate throughput" });
  const ticks = svg("g");
  const area = svg("path", { class: "area" });
  const line = svg("path", { class: "line" });
  root.append(ticks, area, line);
  return {
    svg: root,
    draw(points) {
      const top = roundUp(Math.max(...points.map((p) => p[1])));
      const t0 = points[0][0], t1 = points[points.length - 1][0];
      const x = (t) => LEFT + ((t - t0) / (t1 - t0 || 1)) * (W - LEFT - 4);
      const y = (v) => H - BOTTOM - (v / top) * (H - BOTTOM - TOP);
      const path = points.map(([t, v], i) => `${i ? "L" : "M"}${x(t).toFixed(1)},${y(v).toFixed(1)}`).join("");
      line.setAttribute("d", path);
      area.setAttribute("d", `${path}L${x(t1)},${y(0)}L${x(t0)},${y(0)}Z`);
      const parts = [];
      for (const f of [0, 0.5, 1]) {
        parts.push(svg("line", { class: "axis", x1: LEFT, x2: W - 4, y1: y(top * f), y2: y(top * f) }));
        parts.push(svg("text", { class: "tick", x: LEFT - 6, y: y(top * f) + 3, "text-anchor": "end" }, rate(top * f)));
      }
      for (const t of [t0, t0 + (t1 - t0) / 2, t1]) {
        const anchor = t === t0 ? "start" : t === t1 ? "end" : "middle";
        parts.push(svg("text", { class: "tick", x: x(t), y: H - 4, "text-anchor": anchor }, clock.format(new Date(t * 1000))));
      }
      ticks.replaceChildren(...parts);
    },
  };
}
