// One job's page (`#/jobs/<id>`): its timeline, its progress while it runs (denoising steps
// or tokens), its images full size, its text, its input and its webhook deliveries.

import { Backoff, ENDED, Problem, followEvents, jobPath, request } from "./api.js";
import { clock, el, imagesOf, seconds } from "./dom.js";

const DELIVERIES_POLL_MS = 3000;

function timeline(job) {
  const metrics = job.metrics || {};
  const item = (label, when, note) => el("li", {}, el("strong", {}, label), " ", clock(when), note ? ` (${note})` : "");
  return el(
    "ol",
    { class: "timeline" },
    item("Created", job.created_at),
    item("Started", job.started_at, metrics.queue_time_s != null && `queued ${seconds(metrics.queue_time_s)}`),
    item(
      "Ended",
      job.completed_at,
      metrics.run_time_s != null && `ran ${seconds(metrics.run_time_s)}${metrics.batch_size ? `, batch of ${metrics.batch_size}` : ""}`,
    ),
  );
}

function progress(job) {
  if (job.status !== "running" || !job.progress?.total) return null;
  const unit = job.engine === "llm" ? "tokens" : "denoising steps";
  const { step, total } = job.progress;
  return el("p", { class: "progress" }, el("progress", { max: total, value: step }), ` ${step} of ${total} ${unit}`);
}

function facts(job) {
  const pairs = [
    ["Status", job.status],
    ["Engine", job.engine],
    ["Model", job.model],
    ["Worker", job.worker || "–"],
    ["Attempts", String(job.attempts)],
    ["Cache", job.metrics?.cache_hit ? "served from the cache" : "computed"],
    ["Webhook", job.webhook || "none"],
  ];
  if (job.error) pairs.push(["Error", `${job.error.type}: ${job.error.message}`]);
  return el("dl", { class: "facts" }, ...pairs.flatMap(([term, value]) => [el("dt", {}, term), el("dd", {}, value)]));
}

function images(job) {
  const shown = imagesOf(job).map((image) =>
    el("img", { src: image.url, width: image.width, height: image.height, alt: job.input?.prompt || "", class: "full" }),
  );
  return shown.length ? el("div", { class: "images" }, ...shown) : null;
}

function deliveriesTable(deliveries) {
  if (!deliveries.length) return el("p", { class: "muted" }, "No deliveries yet.");
  const last = (delivery) => delivery.attempts[delivery.attempts.length - 1];
  return el(
    "table",
    { class: "deliveries" },
    el("thead", {}, el("tr", {}, ...["Event", "State", "Attempts", "Last answer", "Event at"].map((h) => el("th", {}, h)))),
    el(
      "tbody",
      {},
      ...deliveries.map((delivery) =>
        el(
          "tr",
          {},
          el("td", {}, delivery.type),
          el("td", {}, delivery.state),
          el("td", { class: "number" }, String(delivery.attempts.length)),
          el("td", {}, last(delivery) ? (last(delivery).error ?? `HTTP ${last(delivery).status_code}`) : "–"),
          el("td", {}, clock(delivery.event_at)),
        ),
      ),
    ),
  );
}

const back = () => el("p", {}, el("a", { href: "#/" }, "← All jobs"));
const missing = () => el("p", { class: "form-error" }, "No such job (or it expired).");

/** The page for a hash that names no job (`#/jobs/%E0%A4`, not even a well-formed id). */
export function noSuchJob(view) {
  view.replaceChildren(back(), missing());
  return () => {};
}

/** Show job `id` in `view`; returns the teardown that stops its stream and polls. Only a
 * change of status rebuilds the page: progress redraws its bar, text grows its text node. */
export function jobPage(view, id) {
  const stop = new AbortController();
  const stream = new AbortController(); // also let go of once a re-read finds the job ended
  stop.signal.addEventListener("abort", () => stream.abort(), { once: true });
  let job = null;
  let streamed = "";
  let following = false;
  let timer = null;
  const main = el("div", { class: "job" });
  const paused = el("p", { class: "notice", role: "status", hidden: true }, "Live updates paused, retrying…");
  const progressPlace = el("div", { class: "progress-place" });
  const text = document.createTextNode("");
  const textOutput = el("pre", { class: "text-output" }, text);
  const deliveries = el("div", { class: "deliveries" }, el("p", { class: "muted" }, "Reading the deliveries…"));
  view.replaceChildren(back(), el("h1", { class: "id" }, id), paused, main);

  const cancel = async () => {
    try {
      job = await request(`${jobPath(id)}/cancel`, { method: "POST" });
      draw();
    } catch (error) {
      main.prepend(el("p", { class: "form-error", role: "alert" }, error.message));
    }
  };

  const drawProgress = () => progressPlace.replaceChildren(...[progress(job)].filter((part) => part));

  const draw = () => {
    const canCancel = !ENDED.has(job.status);
    const shownText = job.output?.text ?? (streamed || null);
    text.data = shownText ?? "";
    drawProgress();
    const parts = [
      canCancel ? el("button", { type: "button", class: "cancel", onclick: cancel }, "Cancel job") : null,
      facts(job),
      el("h2", {}, "Timeline"),
      timeline(job),
      progressPlace,
      images(job),
      shownText !== null ? textOutput : null,
      el("h2", {}, "Input"),
      el("pre", { class: "input" }, JSON.stringify(job.input, null, 2)),
      el("h2", {}, "Webhook deliveries"),
      deliveries,
    ];
    main.replaceChildren(...parts.filter((part) => part)); // no "null" for a part the job lacks
  };

  // The job as the API holds it now, for when its stream cannot say (paused or refused).
  const reread = async () => {
    try {
      const fresh = await request(jobPath(id), { signal: stop.signal });
      const changed = fresh.status !== job.status;
      job = fresh;
      if (changed) draw();
      if (ENDED.has(job.status)) stream.abort();
    } catch {
      // Shown as it was; the stream's retries or the next read bring it up to date.
    }
  };

  // Read while the job runs, and after it ended until no delivery is pending or retrying;
  // slower and slower after it ended, and after a refusal (its Retry-After at least).
  const deliveriesBackoff = new Backoff({ first: DELIVERIES_POLL_MS });
  const readDeliveries = async () => {
    let wait = DELIVERIES_POLL_MS;
    try {
      const page = await request(`${jobPath(id)}/deliveries`, { signal: stop.signal });
      deliveries.replaceChildren(deliveriesTable(page.deliveries));
      if (!following && !ENDED.has(job.status)) await reread();
      const settled = page.deliveries.every((d) => !["pending", "retrying"].includes(d.state));
      if (ENDED.has(job.status)) {
        if (settled) return;
        wait = deliveriesBackoff.delay();
      }
    } catch (error) {
      if (stop.signal.aborted) return;
      deliveries.replaceChildren(el("p", { class: "form-error" }, error.message));
      wait = deliveriesBackoff.delay(error instanceof Problem ? error.retryAfterMs : 0);
    }
    if (!stop.signal.aborted) timer = setTimeout(readDeliveries, wait);
  };

  (async () => {
    try {
      job = await request(jobPath(id), { signal: stop.signal });
    } catch (error) {
      if (stop.signal.aborted) return;
      const gone = error instanceof Problem && error.status === 404;
      main.replaceChildren(gone ? missing() : el("p", { class: "form-error" }, error.message));
      return;
    }
    draw();
    readDeliveries();
    if (ENDED.has(job.status)) return;
    following = true;
    // From the stream's start (`0-0`): the text a running job streamed before this page
    // opened comes again, piece by piece, then what follows as it comes.
    const ended = await followEvents(id, {
      after: "0-0",
      signal: stream.signal,
      onPaused: (on) => {
        paused.hidden = !on;
        following = !on;
        if (on) reread();
      },
      onEvent: (type, data) => {
        if (type === "job.delta") {
          streamed += data.text;
          if (textOutput.isConnected && job.output?.text == null) text.appendData(data.text);
          else draw();
        } else if (type === "job.progress") {
          job = { ...job, progress: data };
          drawProgress();
        } else if (data?.id === id) {
          const before = job.status;
          if (type === "job.queued") streamed = ""; // a new attempt streams its text anew
          job = data;
          if (job.status !== before || type === "job.queued") draw();
          else drawProgress();
        }
      },
    });
    following = false;
    paused.hidden = true;
    if (!ended && !ENDED.has(job.status) && !stop.signal.aborted) reread(); // refused (the job expired, say)
  })();

  return () => {
    stop.abort();
    clearTimeout(timer);
  };
}
