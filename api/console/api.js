// Calls to the Blaze Jobs API with the user's key: JSON requests, problem+json errors, and a
// job's server-sent events. EventSource cannot send an Authorization header, so events are
// read with fetch and parsed here.

const KEY_NAME = "blaze.apiKey";

// sessionStorage: the key is this tab's only, and gone when the tab closes.
export const key = {
  get: () => sessionStorage.getItem(KEY_NAME),
  set: (value) => sessionStorage.setItem(KEY_NAME, value),
  forget: () => sessionStorage.removeItem(KEY_NAME),
};

/** The wait an answer's `Retry-After` asks for (seconds or an HTTP date), in ms; 0 without one. */
export function retryAfterMs(answer) {
  const value = answer.headers.get("Retry-After");
  if (!value) return 0;
  const ms = /^\d+$/.test(value.trim()) ? Number(value) * 1000 : Date.parse(value) - Date.now();
  return Number.isFinite(ms) ? Math.max(0, ms) : 0;
}

/** An answer the API refused: its status, problem+json body (`detail`, `errors`) and the
 * wait its `Retry-After` asks for (`retryAfterMs`, 0 without one). */
export class Problem extends Error {
  constructor(status, body, retryAfter = 0) {
    super(body?.detail || body?.title || `HTTP ${status}`);
    this.status = status;
    this.body = body || {};
    this.retryAfterMs = retryAfter;
  }

  /** The message for each faulty field, by the field's name (`input.width`). */
  get fields() {
    return Object.fromEntries((this.body.errors || []).map((e) => [e.field, e.message]));
  }
}

/** Listeners told when the API refuses the key (401), so the console asks for another. */
export const onUnauthorized = new Set();

/** Listeners told of every 429 (with its `Retry-After` in ms, 0 without one), so the list's
 * polls slow down whichever request met the rate limit. */
export const onLimited = new Set();

function refused(answer) {
  if (answer.status === 401) onUnauthorized.forEach((listener) => listener());
  if (answer.status === 429) onLimited.forEach((listener) => listener(retryAfterMs(answer)));
}

/** Waits between tries: from `first` ms doubling to `most`, each drawn between half and all of
 * it (so tabs refused together do not come back together), and never under a `Retry-After`. */
export class Backoff {
  constructor({ first = 1000, most = 30000 } = {}) {
    this.first = first;
    this.most = most;
    this.next = first;
  }

  delay(retryAfter = 0) {
    const base = this.next;
    this.next = Math.min(this.most, base * 2);
    return Math.max(retryAfter, base / 2 + (Math.random() * base) / 2);
  }

  reset() {
    this.next = this.first;
  }
}

export const sleep = (ms, signal) =>
  new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => (clearTimeout(timer), resolve()), { once: true });
  });

/** Resolves once the tab is shown (at once if it is), or when `signal` aborts. */
export const visible = (signal) =>
  new Promise((resolve) => {
    if (!document.hidden || signal.aborted) return resolve();
    const shown = () => {
      if (document.hidden) return;
      document.removeEventListener("visibilitychange", shown);
      resolve();
    };
    document.addEventListener("visibilitychange", shown);
    signal.addEventListener("abort", () => (document.removeEventListener("visibilitychange", shown), resolve()), { once: true });
  });

function headers(extra = {}) {
  return { Authorization: `Bearer ${key.get()}`, ...extra };
}

/** `path` is relative to the console's page (`v1/jobs`), so a prefixed deployment works too. */
export async function request(path, { method = "GET", body, signal } = {}) {
  const init = { method, signal, headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }) };
  if (body !== undefined) init.body = JSON.stringify(body);
  const answer = await fetch(path, init);
  const text = await answer.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = { detail: text.slice(0, 200) };
  }
  if (!answer.ok) {
    refused(answer);
    throw new Problem(answer.status, data, retryAfterMs(answer));
  }
  return data;
}

export const ENDED = new Set(["succeeded", "failed", "canceled"]);

export const jobPath = (id) => `v1/jobs/${encodeURIComponent(id)}`;

/** Split a text/event-stream into events: `{event, data, id}` for each blank-line-ended block. */
export function parseEvents(buffer, emit) {
  // A CR that ends this piece may be half of a CRLF: it waits for the next piece.
  const held = buffer.endsWith("\r") ? "\r" : "";
  const blocks = buffer.slice(0, buffer.length - held.length).replace(/\r\n?/g, "\n").split("\n\n");
  const rest = blocks.pop() + held;
  for (const block of blocks) {
    const event = { event: "message", data: [], id: null };
    for (const line of block.split("\n")) {
      if (!line || line.startsWith(":")) continue; // a keep-alive comment
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "event") event.event = value;
      else if (field === "data") event.data.push(value);
      else if (field === "id") event.id = value;
    }
    if (event.data.length) emit({ ...event, data: event.data.join("\n") });
    else if (event.id !== null) emit({ ...event, data: "" });
  }
  return rest;
}

// A refusal worth asking again after a while: the API, or a proxy before it, was busy or failing.
const passing = (status) => status === 429 || status >= 500;

/**
 * Follow job `id`'s events until `job.completed` or `signal` aborts: `onEvent(type, data)`
 * gets each one with its JSON data (`job` and the status changes carry the job, `job.progress`
 * `{step, total}`, `job.delta` `{text}`). `after`: an event id to read on from instead (`0-0`:
 * the whole stream, without the first `job` event). Resolves to whether the job's end was seen.
 *
 * Each stream holds one of the six connections a browser opens to the API (across all its
 * tabs), so it is closed while the tab is hidden and opened again when it is shown. A stream
 * refused for a while (429, 5xx) or dropped is asked for again after the last event seen
 * (`Last-Event-ID`), after a back-off (`Backoff`); `onPaused(true)` says live updates stopped
 * meanwhile, `onPaused(false)` that they came back.
 */
export async function followEvents(id, { onEvent, signal, after = null, onPaused = () => {} }) {
  let lastId = after;
  const backoff = new Backoff();
  while (!signal.aborted) {
    await visible(signal);
    if (signal.aborted) break;
    const connection = new AbortController();
    let hid = false;
    const hidden = () => {
      if (!document.hidden) return;
      hid = true;
      connection.abort();
    };
    const closed = () => connection.abort();
    document.addEventListener("visibilitychange", hidden);
    signal.addEventListener("abort", closed, { once: true });
    let ended = false;
    let wait = 0;
    try {
      const extra = { Accept: "text/event-stream" };
      if (lastId) extra["Last-Event-ID"] = lastId;
      const answer = await fetch(`${jobPath(id)}/events`, { headers: headers(extra), signal: connection.signal });
      if (!answer.ok) {
        refused(answer);
        // 404: the job expired or is not the key's; nothing to follow (nor after a 401 or 403).
        if (!passing(answer.status)) return false;
        wait = backoff.delay(retryAfterMs(answer));
      } else {
        onPaused(false);
        const reader = answer.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer = parseEvents(buffer + value, (event) => {
            if (event.id) lastId = event.id;
            if (!event.data) return;
            backoff.reset(); // the stream works: a later drop starts over from a second
            const data = JSON.parse(event.data);
            onEvent(event.event, data);
            // A job that had ended already is answered with one `job` event, then the end.
            if (event.event === "job.completed" || ENDED.has(data.status)) ended = true;
          });
        }
      }
    } catch {
      // Dropped, or closed by this tab (hidden, or the view left): told apart below.
    } finally {
      document.removeEventListener("visibilitychange", hidden);
      signal.removeEventListener("abort", closed);
    }
    // The stream of an ended job closes after its last event.
    if (ended) return true;
    if (signal.aborted) break;
    if (hid) continue; // opened again once the tab is shown
    onPaused(true);
    await sleep(wait || backoff.delay(), signal);
  }
  return false;
}
