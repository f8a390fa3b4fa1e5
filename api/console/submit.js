// The submit form: an image job (engine diffusion) or a text job (engine llm), posted to
// `POST /v1/jobs` as any client would. A refusal's problem+json names the faulty fields
// (`errors[].field`, e.g. `input.width`): each message is shown beside its field.

import { Problem, request } from "./api.js";
import { el, jobHref } from "./dom.js";

// The inputs of each engine the form offers, by the name the API gives the field.
const ENGINES = {
  diffusion: [
    { field: "input.prompt", label: "Prompt", kind: "textarea" },
    { field: "input.width", label: "Width", kind: "number", value: 64, step: 8, min: 8 },
    { field: "input.height", label: "Height", kind: "number", value: 64, step: 8, min: 8 },
    { field: "input.num_inference_steps", label: "Steps", kind: "number", value: 20, min: 1 },
  ],
  llm: [
    { field: "input.prompt", label: "Prompt", kind: "textarea" },
    { field: "input.max_new_tokens", label: "Max tokens", kind: "number", value: 64, min: 1 },
  ],
};

function control(engine, spec) {
  const name = spec.field.slice("input.".length);
  const props = { name, id: `${engine}-${name}`, required: spec.kind === "textarea" };
  const input =
    spec.kind === "textarea"
      ? el("textarea", { ...props, rows: 3 })
      : el("input", { ...props, type: "number", value: spec.value, step: spec.step, min: spec.min });
  return el(
    "div",
    { class: "field", dataset: { field: spec.field } },
    el("label", { htmlFor: props.id }, spec.label),
    input,
    el("span", { class: "field-error", role: "alert" }),
  );
}

function body(engine, form) {
  const input = {};
  for (const spec of ENGINES[engine]) {
    const name = spec.field.slice("input.".length);
    const value = form.elements[name].value;
    if (value === "") continue; // the engine's default
    input[name] = spec.kind === "number" ? Number(value) : value;
  }
  return { engine, input };
}

/** The form; a job it creates is handed to `live` at once, so its row shows straight away,
 * and the line under the form follows that job's status as `live` learns it. `close` stops
 * following. */
export function submitSection(live) {
  let engine = "diffusion";
  let made = null; // the id of the job the status line names
  const fields = el("div", { class: "fields" });
  const status = el("p", { class: "form-status", role: "status" });
  const say = (job) =>
    status.replaceChildren("Job ", el("a", { href: jobHref(job.id) }, job.id), ` ${job.status}.`);
  // Called with a job that changed, or with null when the whole list was read again.
  const follow = (job) => {
    const now = job === null ? live.jobs.get(made) : job.id === made && job;
    if (now) say(now);
  };
  live.listeners.add(follow);
  const general = el("p", { class: "form-error", role: "alert" });
  const choose = (name) => {
    engine = name;
    fields.replaceChildren(...ENGINES[name].map((spec) => control(name, spec)));
  };
  const choice = el(
    "fieldset",
    { class: "engines" },
    el("legend", {}, "Engine"),
    ...Object.keys(ENGINES).map((name) =>
      el(
        "label",
        {},
        el("input", { type: "radio", name: "engine", value: name, checked: name === engine, onchange: () => choose(name) }),
        name === "diffusion" ? " Image (diffusion)" : " Text (llm)",
      ),
    ),
  );
  const send = el("button", { type: "submit" }, "Submit job");
  const form = el("form", { id: "submit-form", noValidate: true }, choice, fields, general, send, status);

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    form.querySelectorAll(".field-error").forEach((node) => (node.textContent = ""));
    general.textContent = "";
    status.replaceChildren();
    made = null;
    send.disabled = true;
    try {
      const job = await request("v1/jobs", { method: "POST", body: body(engine, form) });
      made = job.id;
      live.put(job); // says it, through follow
    } catch (error) {
      showProblem(form, general, error);
    } finally {
      send.disabled = false;
    }
  });

  choose(engine);
  const node = el("section", { class: "submit" }, el("h2", {}, "Submit a job"), form);
  return { node, close: () => live.listeners.delete(follow) };
}

function showProblem(form, general, error) {
  if (!(error instanceof Problem)) {
    general.textContent = `The API could not be reached: ${error.message}`;
    return;
  }
  const left = [];
  for (const [field, message] of Object.entries(error.fields)) {
    const place = [...form.querySelectorAll(".field")].find((node) => node.dataset.field === field);
    if (place) place.querySelector(".field-error").textContent = message;
    else left.push(`${field}: ${message}`);
  }
  // The detail names what no field shows (a rate limit, a full queue, a field the form lacks).
  general.textContent = left.length ? left.join("; ") : Object.keys(error.fields).length ? "" : error.message;
}
