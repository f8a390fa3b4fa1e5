// One job's page (`#/jobs/<id>`): its timeline, its progress while it runs (denoising steps
// or tokens), its images full size, its text, its input and its webhook deliveries.

import { ENDED, Problem, followEvents, jobPath, request } from "./api.js";
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

function output(job, streamed) {
  const images = imagesOf(job).map((image) =>
    el("img", { src: image.url, width: image.width, height: image.height, alt: job.input?.prompt || "", class: "full" }),
  );
  const text = job.output?.text ?? (streamed || null);
  return [
    images.length ? el("div", { class: "images" }, ...images) : null,
    text !== null ? el("pre", { class: "text-output" }, text) : null,
  ];
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

/** Show job `id` in `view`; returns the teardown that stops its stream and polls. */
export function jobPage(view, id) {
  const stop = new AbortController();
  let job = null;
  let streamed = "";
  let timer = null;
  const main = el("div", { class: "job" });
  const deliveries = el("div", { class: "deliveries" }, el("p", { class: "muted" }, "Reading the deliveries…"));
  view.replaceChildren(el("p", {}, el("a", { href: "#/" }, "← All jobs")), el("h1", { class: "id" }, id), main);

  const cancel = async () => {
    try {
      job = await request(`${jobPath(id)}/cancel`, { method: "POST" });
      draw();
    } catch (error) {
      main.prepend(el("p", { class: "form-error", role: "alert" }, error.message));
    }
  };

  const draw = () => {
    const canCancel = !ENDED.has(job.status);
    const parts = [
      canCancel ? el("button", { type: "button", class: "cancel", onclick: cancel }, "Cancel job") : null,
      facts(job),
      el("h2", {}, "Timeline"),
      timeline(job),
      progress(job),
      ...output(job, streamed),
      el("h2", {}, "Input"),
      el("pre", { class: "input" }, JSON.stringify(job.input, null, 2)),
      el("h2", {}, "Webhook deliveries"),
      deliveries,
    ];
    main.replaceChildren(...parts.filter((part) => part)); // no "null" for a part the job lacks
  };

  const readDeliveries = async () => {
    try {
      const page = await request(`${jobPath(id)}/deliveries`, { signal: stop.signal });
      deliveries.replaceChildren(deliveriesTable(page.deliveries));
      const settled = page.deliveries.every((d) => !["pending", "retrying"].includes(d.state));
      if (settled && ENDED.has(job.status)) return;
    } catch (error) {
      if (stop.signal.aborted) return;
      deliveries.replaceChildren(el("p", { class: "form-error" }, error.message));
    }
    timer = setTimeout(readDeliveries, DELIVERIES_POLL_MS);
  };

  (async () => {
    try {
      job = await request(jobPath(id), { signal: stop.signal });
    } catch (error) {
      if (stop.signal.aborted) return;
      const missing = error instanceof Problem && error.status === 404;
      main.replaceChildren(el("p", { class: "form-error" }, missing ? "No such job (or it expired)." : error.message));
      return;
    }
    draw();
    readDeliveries();
    if (ENDED.has(job.status)) return;
    // From the stream's start (`0-0`): the text a running job streamed before this page
    // opened comes again, piece by piece, then what follows as it comes.
    await followEvents(id, {
      after: "0-0",
      signal: stop.signal,
      onEvent: (type, data) => {
        if (type === "job.delta") streamed += data.text;
        else if (type === "job.progress") job = { ...job, progress: data };
        else if (data?.id === id) job = data;
        if (type === "job.queued") streamed = ""; // a new attempt streams its text anew
        draw();
      },
    });
  })();

  return () => {
    stop.abort();
    clearTimeout(timer);
  };
}
