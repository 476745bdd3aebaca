// imagebot status page: live updates over SSE. The pages work without this script; it only
// fetches the server's own HTML fragments when the streams say something changed.
"use strict";

const LOG_KEEP = 3000; // lines the log tail keeps in the page

function debounce(fn, ms) {
  let timer = null;
  return () => { clearTimeout(timer); timer = setTimeout(fn, ms); };
}

function fragment(html) {
  const template = document.createElement("template");
  template.innerHTML = html.trim();
  return template.content.firstElementChild;
}

function liveIndicator(source) {
  const badge = document.getElementById("live");
  if (!badge) return;
  source.addEventListener("open", () => { badge.hidden = false; });
  source.addEventListener("error", () => { badge.hidden = true; });
}

// -- the build list ---------------------------------------------------------------------------

function followList(table) {
  const filters = JSON.parse(table.dataset.filters);
  const firstPage = JSON.parse(table.dataset.firstPage);
  const body = table.tBodies[0];
  const matches = (build) => Object.entries(filters).every(([key, value]) => !value || build[key] === value);
  const newest = () => Math.max(0, ...[...body.rows].map((row) => Number(row.dataset.id)));

  async function update(build) {
    const existing = document.getElementById(`build-${build.id}`);
    if (!existing && !(firstPage && matches(build) && build.id > newest())) return;
    const response = await fetch(`/builds/${build.id}/row`);
    if (!response.ok) return;
    const row = fragment(await response.text());
    row.classList.add("fresh");
    const current = document.getElementById(`build-${build.id}`);
    if (current) current.replaceWith(row); else body.prepend(row);
    document.querySelector(".empty")?.remove();
  }

  const source = new EventSource(`/api/events?after=${encodeURIComponent(table.dataset.position)}`);
  liveIndicator(source);
  source.addEventListener("status", (event) => update(JSON.parse(event.data)));
  source.addEventListener("resync", () => {
    for (const row of [...body.rows]) update({ id: Number(row.dataset.id) });
  });
}

// -- one build --------------------------------------------------------------------------------

function followBuild(page) {
  const id = page.dataset.build;
  const parts = document.getElementById("live-parts");
  const log = document.getElementById("log");

  const refresh = debounce(async () => {
    const response = await fetch(`/builds/${id}/live`);
    if (response.ok) parts.innerHTML = await response.text();
  }, 150);
  // A running build's timeline grows with the clock, not only with its events.
  setInterval(() => {
    const status = parts.querySelector(".build-head")?.dataset.status;
    if (status === "running") refresh();
  }, 2000);

  function append(line) {
    const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    const prefix = document.createElement("span");
    prefix.className = "p";
    prefix.textContent = `[${line.platform || "build"}]`;
    log.append(prefix, ` ${line.line}\n`);
    while (log.childNodes.length > LOG_KEEP * 2) log.firstChild.remove();
    if (atBottom) log.scrollTop = log.scrollHeight;
  }

  log.scrollTop = log.scrollHeight; // it is a tail
  const source = new EventSource(`/api/builds/${id}/stream?after=${encodeURIComponent(page.dataset.position)}`);
  liveIndicator(source);
  source.addEventListener("log", (event) => append(JSON.parse(event.data)));
  for (const kind of ["telemetry", "status", "resync"]) source.addEventListener(kind, refresh);
}

document.addEventListener("DOMContentLoaded", () => {
  const table = document.querySelector("[data-live-list]");
  if (table) followList(table);
  const page = document.querySelector("[data-build]");
  if (page) followBuild(page);
});
