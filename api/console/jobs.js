// The recent jobs, kept live: the list is polled for new jobs, and each queued or running
// job's event stream brings its changes as they happen. The table and the gallery redraw only
// the jobs that changed.

import { ENDED, followEvents, onLimited, request } from "./api.js";
import { clock, el, imagesOf, jobHref, progressOf, seconds } from "./dom.js";

const POLL_MS = 3000;
// After a 429 the list is read again after its Retry-After, or at twice the last interval.
const MOST_POLL_MS = 30000;
const PAGE = 50;
const GALLERY = 24;
// A browser opens at most six HTTP/1.1 connections to one origin across all its tabs, and
// each stream holds one: following more at once would leave the polls, other tabs and the
// form's posts waiting. Jobs beyond these are still brought up to date by the polls.
export const MAX_STREAMS = 2;

const created = (job) => Date.parse(job.created_at);

export class LiveJobs {
  constructor() {
    this.jobs = new Map();
    this.streams = new Map();
    this.resting = new Set();
    this.listeners = new Set();
    this.timer = null;
    this.error = null;
    this.round = 0;
    this.interval = POLL_MS;
    this.streamLimit = MAX_STREAMS;
    onLimited.add((retryAfter) => this.slowDown(retryAfter));
  }

  // Each start begins a new round of polls; a poll of an earlier round (still in flight when
  // the key was forgotten, say) ends its round instead of scheduling the next.
  start() {
    this.running = true;
    this.round += 1;
    this.poll(this.round);
  }

  stop() {
    this.running = false;
    this.round += 1;
    this.interval = POLL_MS;
    clearTimeout(this.timer);
    this.timer = null;
    this.streams.forEach((stream) => stream.abort());
    this.streams.clear();
    this.jobs.clear();
  }

  /** Newest first, as `GET /v1/jobs` lists them. */
  list() {
    return [...this.jobs.values()].sort((a, b) => created(b) - created(a)).slice(0, PAGE);
  }

  async poll(round) {
    if (round !== this.round) return;
    // A tab in the background asks nothing until it is looked at again.
    if (document.hidden) {
      document.addEventListener("visibilitychange", () => this.poll(round), { once: true });
      return;
    }
    try {
      const page = await request(`v1/jobs?limit=${PAGE}`);
      if (round !== this.round) return; // the key was forgotten meanwhile
      this.error = null;
      this.interval = POLL_MS;
      this.resting.clear();
      this.keepOnly(page.jobs);
      for (const job of page.jobs) this.put(job, { fromList: true });
    } catch (error) {
      if (round !== this.round) return;
      this.error = error; // a 429 has slowed the polls down already (`slowDown`)
    }
    this.changed(null);
    this.follow();
    this.schedule(round);
  }

  schedule(round) {
    clearTimeout(this.timer);
    this.timer = setTimeout(() => {
      this.timer = null;
      this.poll(round);
    }, this.interval);
  }

  /** A 429 on any request: the list waits its Retry-After, or twice as long as it last did.
   * A poll already waiting for its turn waits the new interval instead (one in flight
   * schedules the next itself). */
  slowDown(retryAfter) {
    if (!this.running) return;
    this.interval = retryAfter ? Math.max(retryAfter, POLL_MS) : Math.min(MOST_POLL_MS, this.interval * 2);
    if (this.timer !== null) this.schedule(this.round);
  }

  /** Follow at most `limit` streams from now on: a job's page follows its own, and the list
   * none meanwhile, so one tab never holds more than MAX_STREAMS. */
  limitStreams(limit) {
    this.streamLimit = limit;
    this.follow();
  }

  /** Forget the jobs `listed` lacks, but for the followed ones and those newer than the list
   * (submitted from the form while it was being read): the map does not grow without bound. */
  keepOnly(listed) {
    const kept = new Set([...listed.map((job) => job.id), ...this.streams.keys()]);
    const newest = listed.length ? created(listed[0]) : -Infinity;
    for (const [id, job] of this.jobs) if (!kept.has(id) && !(created(job) > newest)) this.jobs.delete(id);
  }

  /** Take a newer view of a job. A list answer sent before an event arrived may be older than
   * it: once a stream said a job ended, the list cannot set it back. */
  put(job, { fromList = false } = {}) {
    const known = this.jobs.get(job.id);
    if (fromList && known && ENDED.has(known.status) && !ENDED.has(job.status)) return;
    this.jobs.set(job.id, job);
    this.changed(job);
    this.follow();
  }

  /** Follow the newest queued or running jobs' streams (at most `streamLimit`), letting go
   * of older ones a newer job needs the place of. */
  follow() {
    if (!this.running) return;
    const wanted = this.list()
      .filter((job) => !ENDED.has(job.status) && !this.resting.has(job.id))
      .slice(0, this.streamLimit)
      .map((job) => job.id);
    for (const [id, stream] of this.streams) {
      if (!wanted.includes(id)) {
        stream.abort();
        this.streams.delete(id);
      }
    }
    for (const id of wanted.filter((each) => !this.streams.has(each))) {
      const stream = new AbortController();
      this.streams.set(id, stream);
      followEvents(id, {
        signal: stream.signal,
        onEvent: (type, data) => {
          // A job let go of meanwhile (no longer listed) is not brought back by a late event.
          if (!this.jobs.has(id)) return;
          if (type === "job.progress") this.put({ ...this.jobs.get(id), progress: data });
          else if (data && data.id === id) this.put(data);
        },
      }).then((ended) => {
        if (this.streams.get(id) !== stream) return;
        this.streams.delete(id);
        // A stream refused (the job expired, say) is not asked for again until the next poll.
        if (!ended) this.resting.add(id);
        this.follow();
      });
    }
  }

  changed(job) {
    this.listeners.forEach((listener) => listener(job));
  }
}

function statusCell(job) {
  const cell = el("td", { class: `status status-${job.status}` }, job.status);
  if (job.status === "running" && job.progress?.total) {
    cell.append(" ", el("progress", { max: job.progress.total, value: job.progress.step, title: progressOf(job) }));
  }
  return cell;
}

function row(job) {
  const metrics = job.metrics || {};
  return el(
    "tr",
    { dataset: { jobId: job.id, status: job.status } },
    el("td", { class: "id" }, el("a", { href: jobHref(job.id), title: job.id }, job.id)),
    statusCell(job),
    el("td", {}, job.engine),
    el("td", { class: "model" }, job.model),
    el("td", {}, clock(job.created_at)),
    el("td", { class: "number" }, seconds(metrics.queue_time_s)),
    el("td", { class: "number" }, seconds(metrics.run_time_s)),
    el("td", { class: "number" }, metrics.batch_size ?? (metrics.cache_hit ? "cache" : "–")),
  );
}

// The size the job asked for, known before the image loads: the gallery keeps its layout.
function thumbnails(job) {
  return imagesOf(job).map((image, index) =>
    el(
      "a",
      { href: jobHref(job.id), class: "thumbnail", title: job.input?.prompt || job.id },
      el("img", {
        src: image.url,
        alt: job.input?.prompt || "",
        loading: "lazy",
        width: job.input?.width ?? image.width,
        height: job.input?.height ?? image.height,
        dataset: { jobId: job.id, index },
      }),
    ),
  );
}

/** The jobs table and the image gallery, kept in step with `live`; returns their teardown. */
export function jobsSection(live) {
  const body = el("tbody");
  const empty = el("p", { class: "muted" }, "No jobs yet: submit one.");
  const problem = el("p", { class: "form-error", role: "alert" });
  const gallery = el("div", { class: "gallery", id: "gallery" });
  const rows = new Map();
  const pictures = new Map();

  // `job`: the one that changed (null: the list was read again). Its row is made anew; then
  // every row and picture is put in the list's order (append moves a node already shown).
  // The gallery shows the newest GALLERY images only.
  const draw = (job) => {
    for (const each of job ? [job] : live.list()) {
      const fresh = row(each);
      rows.get(each.id)?.replaceWith(fresh);
      rows.set(each.id, fresh);
    }
    const listed = live.list();
    const shown = new Set(listed.map((each) => each.id));
    for (const [id, node] of rows) {
      if (!shown.has(id)) {
        node.remove();
        rows.delete(id);
      }
    }
    const pictured = [];
    for (const each of listed) {
      if (pictured.length >= GALLERY) break;
      if (!pictures.has(each.id) && imagesOf(each).length) pictures.set(each.id, thumbnails(each));
      pictured.push(...(pictures.get(each.id) || []).slice(0, GALLERY - pictured.length));
    }
    const inGallery = new Set(pictured);
    for (const [id, nodes] of pictures) {
      if (!nodes.some((node) => inGallery.has(node))) pictures.delete(id);
    }
    body.append(...listed.map((each) => rows.get(each.id)));
    gallery.replaceChildren(...pictured);
    empty.hidden = rows.size > 0;
    problem.textContent = live.error ? `Could not list the jobs: ${live.error.message}` : "";
  };

  const section = el(
    "section",
    { class: "jobs" },
    el("h2", {}, "Recent jobs"),
    problem,
    el(
      "table",
      { id: "jobs" },
      el(
        "thead",
        {},
        el("tr", {}, ...["Job", "Status", "Engine", "Model", "Created", "Queued", "Ran", "Batch"].map((h) => el("th", {}, h))),
      ),
      body,
    ),
    empty,
    el("h2", {}, "Images"),
    gallery,
  );
  live.listeners.add(draw);
  draw(null);
  return { node: section, close: () => live.listeners.delete(draw) };
}
