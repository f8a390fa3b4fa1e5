// Building the page: every piece of data goes in as text (a text node or textContent), never
// as markup, so a prompt or an error message cannot add elements or scripts.

/** `el("a", {href, class}, "text", child)`: an element with properties and children. */
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name in node) node[name] = value;
    else node.setAttribute(name, value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) node.append(child); // strings become text nodes
  }
  return node;
}

export const jobHref = (id) => `#/jobs/${encodeURIComponent(id)}`;

/** An artifact URL as the API gave it, if it is one a page may load (http or https). */
export function safeUrl(url) {
  try {
    const parsed = new URL(url, document.baseURI);
    return parsed.protocol === "http:" || parsed.protocol === "https:" ? parsed.href : null;
  } catch {
    return null;
  }
}

export function seconds(value) {
  if (value === null || value === undefined) return "–";
  if (value < 1) return `${Math.round(value * 1000)} ms`;
  if (value < 120) return `${value.toFixed(1)} s`;
  return `${Math.floor(value / 60)} min ${Math.round(value % 60)} s`;
}

export function clock(iso) {
  return iso ? new Date(iso).toLocaleString() : "–";
}

/** The images of a job's output (`output.images`), each `{url, width, height, …}`. */
export function imagesOf(job) {
  const images = job?.output?.images;
  return Array.isArray(images) ? images.filter((image) => image && safeUrl(image.url)) : [];
}

export function progressOf(job) {
  const progress = job?.progress;
  return progress && progress.total ? `${progress.step}/${progress.total}` : "";
}
