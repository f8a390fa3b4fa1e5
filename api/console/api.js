// Calls to the Blaze Jobs API with the user's key: JSON requests, problem+json errors, and a
// job's server-sent events. EventSource cannot send an Authorization header, so events are
// read with fetch and parsed here.

const KEY_NAME = "blaze.apiKey";

export const key = {
  get: () => localStorage.getItem(KEY_NAME),
  set: (value) => localStorage.setItem(KEY_NAME, value),
  forget: () => localStorage.removeItem(KEY_NAME),
};

/** An answer the API refused: its status and problem+json body (`detail`, `errors`). */
export class Problem extends Error {
  constructor(status, body) {
    super(body?.detail || body?.title || `HTTP ${status}`);
    this.status = status;
    this.body = body || {};
  }

  /** The message for each faulty field, by the field's name (`input.width`). */
  get fields() {
    return Object.fromEntries((this.body.errors || []).map((e) => [e.field, e.message]));
  }
}

/** Listeners told when the API refuses the key (401), so the console asks for another. */
export const onUnauthorized = new Set();

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
    if (answer.status === 401) onUnauthorized.forEach((listener) => listener());
    throw new Problem(answer.status, data);
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

/**
 * Follow job `id`'s events until `job.completed` or `signal` aborts: `onEvent(type, data)`
 * gets each one with its JSON data (`job` and the status changes carry the job, `job.progress`
 * `{step, total}`, `job.delta` `{text}`). `after`: an event id to read on from instead (`0-0`:
 * the whole stream, without the first `job` event). A dropped stream is taken up again after the last
 * event seen (`Last-Event-ID`), after a second, as an EventSource would. Resolves to whether
 * the job's end was seen.
 */
export async function followEvents(id, { onEvent, signal, after = null }) {
  let lastId = after;
  while (!signal.aborted) {
    let ended = false;
    try {
      const extra = { Accept: "text/event-stream" };
      if (lastId) extra["Last-Event-ID"] = lastId;
      const answer = await fetch(`${jobPath(id)}/events`, { headers: headers(extra), signal });
      if (!answer.ok) {
        if (answer.status === 401) onUnauthorized.forEach((listener) => listener());
        return false; // 404: the job expired or is not the key's; nothing to follow
      }
      const reader = answer.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer = parseEvents(buffer + value, (event) => {
          if (event.id) lastId = event.id;
          if (!event.data) return;
          const data = JSON.parse(event.data);
          onEvent(event.event, data);
          // A job that had ended already is answered with one `job` event, then the end.
          if (event.event === "job.completed" || ENDED.has(data.status)) ended = true;
        });
      }
    } catch {
      if (signal.aborted) return false;
    }
    // The stream of an ended job closes after its last event.
    if (ended) return true;
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
  return false;
}
