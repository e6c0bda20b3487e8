// How the dashboard writes times, sizes and rates: as people read them.

const clockFormat = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit" });
const dayFormat = new Intl.DateTimeFormat(undefined, { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });

/** A Date from the API's ISO 8601 text, or from Unix seconds (deployments). */
export function when(value) {
  if (value === null || value === undefined) return null;
  return typeof value === "number" ? new Date(value * 1000) : new Date(value);
}

/** Local time of day; with the date when it is not today. */
export function clock(date) {
  if (!date) return "";
  const today = new Date();
  return date.toDateString() === today.toDateString() ? clockFormat.format(date) : dayFormat.format(date);
}

/** "just now", "42 s ago", "3 min ago", "2 h ago", "5 days ago". */
export function ago(date, now = Date.now()) {
  if (!date) return "";
  const s = Math.max(0, (now - date.getTime()) / 1000);
  if (s < 5) return "just now";
  if (s < 60) return `${Math.floor(s)} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  const days = Math.floor(s / 86400);
  return `${days} day${days === 1 ? "" : "s"} ago`;
}

/** A duration: "0.4 s", "12 s", "3 min 05 s", "1 h 02 min". */
export function duration(seconds) {
  if (seconds === null || seconds === undefined) return "";
  if (seconds < 10) return `${seconds.toFixed(1)} s`;
  if (seconds < 60) return `${Math.round(seconds)} s`;
  const m = Math.floor(seconds / 60);
  if (m < 60) return `${m} min ${String(Math.round(seconds % 60)).padStart(2, "0")} s`;
  return `${Math.floor(m / 60)} h ${String(m % 60).padStart(2, "0")} min`;
}

const UNITS = ["B", "KB", "MB", "GB", "TB", "PB"];

/** Bytes in decimal units: "512 B", "1.5 GB". */
export function bytes(n) {
  let value = n;
  let unit = 0;
  while (value >= 1000 && unit < UNITS.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return unit === 0 ? `${value} B` : `${value.toFixed(value < 10 ? 2 : value < 100 ? 1 : 0)} ${UNITS[unit]}`;
}

export function rate(bytesPerSecond) {
  return `${bytes(Math.round(bytesPerSecond))}/s`;
}

export function percent(done, total) {
  return total > 0 ? Math.min(100, Math.floor((100 * done) / total)) : null;
}

/** An element with a class and text (text, never HTML: messages come from nodes). */
export function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = text;
  return node;
}

export const byName = new Intl.Collator(undefined, { numeric: true }).compare;
