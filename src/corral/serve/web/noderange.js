// The grid's filter: noderanges as corral writes them (n[001-100], rack[1-3]n[01-40],
// names, lists with commas), a * wildcard, or a state's name.

function compile(token) {
  const ranges = [];
  let pattern = "^";
  let rest = token;
  while (rest.length) {
    const bracket = rest.match(/^\[(\d+)-(\d+)\]/);
    if (bracket) {
      ranges.push([Number(bracket[1]), Number(bracket[2])]);
      pattern += "(\\d+)";
      rest = rest.slice(bracket[0].length);
    } else if (rest[0] === "*") {
      pattern += ".*";
      rest = rest.slice(1);
    } else {
      pattern += rest[0].replace(/[.+?^${}()|[\]\\]/g, "\\$&");
      rest = rest.slice(1);
    }
  }
  const exact = new RegExp(`${pattern}$`, "i");
  const plain = ranges.length === 0 && !token.includes("*");
  return (name) => {
    if (plain) return name.toLowerCase().startsWith(token.toLowerCase());
    const found = exact.exec(name);
    return Boolean(found) && ranges.every(([lo, hi], i) => {
      const n = Number(found[i + 1]);
      return n >= lo && n <= hi;
    });
  };
}

/** Split on commas and spaces that are not inside brackets. */
function tokens(text) {
  const out = [];
  let depth = 0;
  let current = "";
  for (const ch of text) {
    if (ch === "[") depth += 1;
    if (ch === "]") depth = Math.max(0, depth - 1);
    if ((ch === "," || ch === " ") && depth === 0) {
      if (current) out.push(current);
      current = "";
    } else {
      current += ch;
    }
  }
  if (current) out.push(current);
  return out;
}

/** A test of a node {node, state} for the filter's text; null when the text is empty. */
export function nodeFilter(text, states) {
  const names = [];
  const wanted = new Set();
  for (const token of tokens(text.trim())) {
    if (states.includes(token.toLowerCase())) wanted.add(token.toLowerCase());
    else names.push(compile(token));
  }
  if (!names.length && !wanted.size) return null;
  return (row) => (!wanted.size || wanted.has(row.state)) && (!names.length || names.some((test) => test(row.node)));
}
