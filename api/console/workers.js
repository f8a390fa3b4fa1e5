// The live workers (`GET /v1/workers`, an admin key's view): engine, device, breaker state,
// the jobs each holds, and how busy its device is.

import { Problem, request } from "./api.js";
import { el, seconds } from "./dom.js";

const POLL_MS = 3000;

// `device_busy`: the share of recent time the device spent running batches (0 to 1).
const share = (value) => (typeof value === "number" ? `${Math.round(value * 100)}%` : "–");

function breaker(worker) {
  const state = worker.breaker?.state || "–";
  const failures = worker.breaker?.consecutive_failures;
  return el("td", { class: `breaker breaker-${state}` }, state, failures ? ` (${failures} failing)` : "");
}

function table(workers) {
  if (!workers.length) return el("p", { class: "muted" }, "No live workers.");
  const busy = workers.some((w) => "device_busy" in w);
  const header = ["Name", "Engine", "Device", "Models", "Breaker", "Busy", "Jobs run", "Mean batch", "Last beat"];
  if (busy) header.splice(6, 0, "Device busy");
  const now = Date.now() / 1000;
  const sorted = [...workers].sort((a, b) => `${a.engine} ${a.name}`.localeCompare(`${b.engine} ${b.name}`));
  return el(
    "table",
    { id: "workers" },
    el("thead", {}, el("tr", {}, ...header.map((h) => el("th", {}, h)))),
    el(
      "tbody",
      {},
      ...sorted.map((worker) =>
        el(
          "tr",
          { dataset: { worker: worker.name } },
          el("td", {}, worker.name || "–"),
          el("td", {}, worker.engine || "–"),
          el("td", {}, worker.device || "–"),
          el("td", {}, (worker.models || []).join(", ") || "–"),
          breaker(worker),
          el("td", { class: "number" }, String(worker.jobs_held ?? 0)),
          busy ? el("td", { class: "number device-busy" }, share(worker.device_busy)) : null,
          el("td", { class: "number" }, String(worker.jobs_run ?? 0)),
          el("td", { class: "number" }, worker.mean_batch_size ?? "–"),
          el("td", {}, worker.heartbeat_at ? `${seconds(Math.max(0, now - worker.heartbeat_at))} ago` : "–"),
        ),
      ),
    ),
  );
}

/** Show the workers in `view`, read again every few seconds; returns the teardown. */
export function workersPage(view) {
  let timer = null;
  const stop = new AbortController();
  const place = el("div", {}, el("p", { class: "muted" }, "Reading the workers…"));
  view.replaceChildren(el("h1", {}, "Workers"), place);
  const read = async () => {
    let wait = POLL_MS;
    try {
      const page = await request("v1/workers", { signal: stop.signal });
      place.replaceChildren(table(page.workers));
    } catch (error) {
      if (stop.signal.aborted) return;
      if (error instanceof Problem && error.status === 403) {
        // The key will not become an admin's by asking again.
        place.replaceChildren(el("p", { class: "form-error" }, "The workers need an admin key: this key's tenant cannot see them."));
        return;
      }
      place.replaceChildren(el("p", { class: "form-error" }, error.message));
      if (error instanceof Problem && error.status === 429) wait = Math.max(POLL_MS, error.retryAfterMs);
    }
    timer = setTimeout(read, wait);
  };
  read();
  return () => {
    stop.abort();
    clearTimeout(timer);
  };
}
