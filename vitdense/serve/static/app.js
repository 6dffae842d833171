// The search page of `vitdense serve`: upload or drop a query, show the nearest images, search again from a
// result, show why (best-buddy correspondences) and the similarity heat map of a clicked point.
(function () {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const token = new URLSearchParams(location.search).get("token");
  const headers = token ? { Authorization: "Bearer " + token } : {};
  const withToken = (url) => token ? url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token) : url;
  const K = 12;
  const state = { query: null, results: [], why: null, busy: 0 };

  function status(text, error) {
    $("status").textContent = text || "";
    $("status").className = error ? "error" : "";
  }

  async function call(method, url, body) {
    state.busy += 1;
    document.body.dataset.busy = "1";
    try {
      const res = await fetch(url, { method, body, headers });
      const data = await res.json().catch(() => ({ error: res.status + " " + res.statusText }));
      if (!res.ok) throw new Error(data.error || res.statusText);
      return data;
    } finally {
      state.busy -= 1;
      if (!state.busy) delete document.body.dataset.busy;
    }
  }

  function showQuery(src, caption) {
    $("query").hidden = false;
    $("query-img").src = src;
    $("query-caption").textContent = caption;
  }

  function render(data) {
    state.results = data.results;
    const grid = $("grid");
    grid.textContent = "";
    for (const hit of data.results) {
      const fig = document.createElement("figure");
      fig.className = "hit";
      fig.dataset.id = hit.id;
      const img = document.createElement("img");
      img.src = withToken("/thumb/" + hit.id);
      img.alt = hit.name;
      img.title = "search from " + hit.name;
      img.addEventListener("click", () => searchId(hit.id, hit.name));
      const cap = document.createElement("figcaption");
      const score = document.createElement("span");
      score.className = "score";
      score.textContent = hit.score.toFixed(3);
      const name = document.createElement("span");
      name.className = "name";
      name.textContent = hit.name;
      cap.append(score, name);
      const why = document.createElement("button");
      why.type = "button";
      why.className = "why";
      why.textContent = "why";
      why.addEventListener("click", () => explain(hit));
      fig.append(img, cap, why);
      grid.append(fig);
    }
    document.body.dataset.results = String(data.results.length);
    status(data.results.length + " result(s)");
  }

  async function searchFile(file) {
    if (!file) return;
    state.query = { file };
    showQuery(URL.createObjectURL(file), file.name || "uploaded image");
    closeWhy();
    status("searching…");
    const form = new FormData();
    form.append("image", file, file.name || "query");
    try { render(await call("POST", "/search?k=" + K, form)); } catch (err) { status(err.message, true); }
  }

  async function searchId(id, name) {
    state.query = { id, name };
    $("file").value = "";  // the picked file is no longer the query
    showQuery(withToken("/thumb/" + id), name);
    closeWhy();
    status("searching…");
    try { render(await call("GET", "/search?k=" + K + "&id=" + encodeURIComponent(id))); } catch (err) { status(err.message, true); }
    window.scrollTo(0, 0);
  }

  function pairForm(hit) {
    const form = new FormData();
    if (state.query.file) form.append("a", state.query.file, state.query.file.name || "query");
    else form.append("a", state.query.id);
    form.append("b", hit.id);
    return form;
  }

  async function explain(hit) {
    $("why").hidden = false;
    $("why-title").textContent = "Why " + hit.name + " (" + hit.score.toFixed(3) + ")";
    $("why-img").removeAttribute("src");
    $("heat-img").hidden = true;
    $("heat-caption").textContent = "";
    status("finding correspondences…");
    try {
      const data = await call("POST", "/correspond", pairForm(hit));
      state.why = { hit, record: data };
      $("why-img").src = data.picture;
      document.body.dataset.why = hit.id;
      status(data.pairs.length + " correspondence(s)" + (data.message ? ": " + data.message : ""));
      $("why").scrollIntoView({ block: "start" });
    } catch (err) { status(err.message, true); }
  }

  function closeWhy() {
    $("why").hidden = true;
    state.why = null;
    delete document.body.dataset.why;
  }

  async function heat(event) {
    if (!state.why) return;
    const img = $("why-img");
    const rect = img.getBoundingClientRect();
    const px = (event.clientX - rect.left) * img.naturalWidth / rect.width;
    const py = (event.clientY - rect.top) * img.naturalHeight / rect.height;
    const size = state.why.record.size_a;  // [H, W] of the query
    const scale = img.naturalHeight / size[0];
    if (px >= Math.round(size[1] * scale)) { status("click a point of the query (left picture)"); return; }
    const form = pairForm(state.why.hit);
    form.append("x", String(px / scale));
    form.append("y", String(py / scale));
    status("similarity…");
    try {
      const data = await call("POST", "/heatmap", form);
      $("heat-img").src = data.picture;
      $("heat-img").hidden = false;
      $("heat-caption").textContent = "cosine similarity to the marked point: " + data.similarity_min.toFixed(2) +
        " (blue) … " + data.similarity_max.toFixed(2) + " (red); the marked point of the result is the most similar";
      document.body.dataset.heat = "1";
      status("");
    } catch (err) { status(err.message, true); }
  }

  $("file").addEventListener("change", (e) => searchFile(e.target.files[0]));
  const drop = $("drop");
  for (const type of ["dragenter", "dragover"]) drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
  for (const type of ["dragleave", "drop"]) drop.addEventListener(type, () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); searchFile(e.dataTransfer.files[0]); });
  $("why-close").addEventListener("click", closeWhy);
  $("why-img").addEventListener("click", heat);

  call("GET", "/stats").then((s) => {
    const index = s.index.kind === "sharded" ? "sharded " + s.index.factory + " index" : s.index.faiss + " index";
    $("about").textContent = s.images + " images · " + s.backbone.model + " · " + s.descriptor.descriptor +
      " descriptor · " + index + " · generation " + s.generation;
  }).catch((err) => status(err.message, true));
  window.vitdenseServe = { state, searchId, searchFile };
})();
