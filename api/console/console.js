// The console's entry: the API key, the hash routes (`#/`, `#/workers`, `#/jobs/<id>`) and
// the live jobs every view shares.

import { key, onUnauthorized } from "./api.js";
import { el } from "./dom.js";
import { jobPage, noSuchJob } from "./job.js";
import { LiveJobs, MAX_STREAMS, jobsSection } from "./jobs.js";
import { submitSection } from "./submit.js";
import { workersPage } from "./workers.js";

const view = document.getElementById("view");
const nav = document.getElementById("nav");
const signIn = document.getElementById("sign-in");
const keyForm = document.getElementById("key-form");
const keyError = document.getElementById("key-error");
const live = new LiveJobs();
let closeView = () => {};

function dashboard() {
  const submit = submitSection(live);
  const jobs = jobsSection(live);
  view.replaceChildren(el("div", { class: "dashboard" }, submit.node, jobs.node));
  return () => {
    submit.close();
    jobs.close();
  };
}

// A hash's id as written (`%E0%A4` decodes to nothing: no job has that id).
function decoded(text) {
  try {
    return decodeURIComponent(text);
  } catch {
    return null;
  }
}

function route() {
  closeView();
  const path = location.hash.replace(/^#/, "") || "/";
  const job = path.match(/^\/jobs\/(.+)$/);
  // A job's page follows that job's stream, and the list none meanwhile.
  live.limitStreams(job ? 0 : MAX_STREAMS);
  if (job) {
    const id = decoded(job[1]);
    closeView = id === null ? noSuchJob(view) : jobPage(view, id);
  } else if (path === "/workers") closeView = workersPage(view);
  else closeView = dashboard();
  nav.querySelectorAll("a").forEach((link) => link.classList.toggle("current", link.hash === `#${path}`));
}

function signedIn() {
  signIn.hidden = true;
  view.hidden = nav.hidden = false;
  live.start();
  route();
}

function signedOut(why = "") {
  closeView();
  closeView = () => {};
  live.stop();
  view.replaceChildren();
  view.hidden = nav.hidden = true;
  signIn.hidden = false;
  keyError.textContent = why;
  keyForm.elements.key.focus();
}

keyForm.addEventListener("submit", (event) => {
  event.preventDefault();
  key.set(keyForm.elements.key.value.trim());
  keyForm.reset();
  signedIn();
});
document.getElementById("forget").addEventListener("click", () => {
  key.forget();
  signedOut();
});
onUnauthorized.add(() => {
  if (!key.get() || signIn.hidden === false) return;
  key.forget();
  signedOut("The API refused that key: enter another.");
});
window.addEventListener("hashchange", () => key.get() && route());

if (key.get()) signedIn();
else signedOut();
