// Deployster's status page: three hash-routed views over the public API (#/, #/services/<name>,
// #/services/<name>/deploys/<id>), kept live by polling it and by a deploy's events stream
// (EventSource). No framework: h() builds the DOM, and text always goes in as text, never as HTML.
// The browser's basic-auth login covers every request: they are all to this origin.

const POLL_MS = 2000;
const FINAL = new Set(["succeeded", "failed", "rolled_back"]);
// Every kind of progress event (the stream names each event by its kind).
const KINDS = [
  "queued", "planned", "submitted", "instance_healthy", "instance_ready", "routed",
  "rolling_back", "retiring", "previous_destroyed", "resumed", "succeeded", "failed",
  "rolled_back",
];
// [symbol, words, tone]: the words carry the meaning, colour only repeats it.
const STATES = {
  succeeded: ["✓", "succeeded", "ok"],
  running: ["▶", "running", "busy"],
  pending: ["○", "pending", "busy"],
  failed: ["✗", "failed", "bad"],
  rolled_back: ["↶", "rolled back", "warn"],
  queued: ["○", "queued", "busy"],
  deployed: ["✓", "deployed", "ok"],
  ignored: ["–", "ignored", "neutral"],
  rejected: ["✗", "rejected", "bad"],
};

// "api", "rollback", "webhook:registry" -> "API", "rollback", "webhook (registry)"
function sourceLabel(source) {
  if (source === "api") return "API";
  const [kind, provider] = source.split(":");
  return provider ? `${kind} (${provider})` : kind;
}

const plural = (count, one, many = `${one}s`) => `${count} ${count === 1 ? one : many}`;

const main = document.getElementById("main");
const conn = document.getElementById("conn");
const dateTime = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });
// In tables: no year, no weekday (the tooltip has the full date and the zone).
const shortTime = new Intl.DateTimeFormat(undefined, {
  month: "short", day: "numeric", hour: "numeric", minute: "2-digit", second: "2-digit",
});
const timeOnly = new Intl.DateTimeFormat(undefined, { timeStyle: "medium" });
const fullTime = new Intl.DateTimeFormat(undefined, {
  dateStyle: "full", timeStyle: "long",
});

// -- DOM helpers ---------------------------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value == null || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    else el.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat(Infinity)) {
    if (child == null || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

// A link that keeps keyboard focus across re-renders (data-key finds it again).
function link(href, ...children) {
  return h("a", { href, "data-key": href }, ...children);
}

function pill(symbol, words, tone) {
  return h("span", { class: `pill ${tone}` }, h("span", { "aria-hidden": "true" }, symbol), ` ${words}`);
}

function stateBadge(state) {
  const [symbol, words, tone] = STATES[state] ?? ["•", String(state).replace(/_/g, " "), "neutral"];
  return pill(symbol, words, tone);
}

function setText(el, text) {
  if (el.textContent !== text) el.textContent = text;
}

function when(iso, format = dateTime) {
  if (!iso) return "—";
  const at = new Date(iso);
  return h("time", { datetime: iso, title: fullTime.format(at) }, format.format(at));
}

function seconds(value) {
  if (value < 60) return `${value < 10 ? value.toFixed(1) : Math.round(value)} s`;
  const s = Math.round(value);
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

function duration(record) {
  const end = record.finished_at ? new Date(record.finished_at) : new Date();
  const took = seconds(Math.max(0, (end - new Date(record.created_at)) / 1000));
  return record.finished_at ? took : `${took} so far`;
}

// "svc:v2:2026.11.26-12.00.00@3.service" -> "v2 @3" (the full name in a tooltip).
function unitLabel(unit) {
  const match = /^[^:]+:([^:]+):[^@]+@(\d+)\.service$/.exec(unit);
  return h("span", { title: unit }, match ? `${match[1]} @${match[2]}` : unit);
}

// A webhook deploy's actor names the push's event and digest: the digest shortened.
function actorLabel(actor) {
  if (!actor) return "—";
  const short = actor.replace(/(sha256:[0-9a-f]{12})[0-9a-f]{52}/g, "$1…");
  return short === actor ? actor : h("span", { title: actor }, short);
}

function machineLabel(machine) {
  if (!machine) return "—";
  return h("code", { title: machine }, machine.length > 12 ? `${machine.slice(0, 8)}…` : machine);
}

function table(caption, columns, rows, empty) {
  if (!rows.length) return h("p", { class: "empty" }, empty);
  return h("table", { class: "stack" },
    h("caption", { class: "sr-only" }, caption),
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, rows.map((cells) =>
      h("tr", {}, cells.map((cell, i) => h("td", { "data-label": columns[i] }, cell))))));
}

function facts(pairs) {
  return h("dl", { class: "facts" },
    pairs.map(([term, value]) => h("div", {}, h("dt", {}, term), h("dd", {}, value))));
}

// Re-render without losing the keyboard user's place.
function keepFocus(render) {
  const key = document.activeElement?.dataset?.key;
  render();
  if (key) document.querySelector(`[data-key="${CSS.escape(key)}"]`)?.focus();
}

// -- the API -------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(path, options = {}) {
  let resp;
  try {
    resp = await fetch(path, { cache: "no-store", ...options });
  } catch {
    throw new ApiError(0, "Deployster cannot be reached");
  }
  const body = (resp.headers.get("Content-Type") || "").includes("json")
    ? await resp.json() : await resp.text();
  if (!resp.ok) throw new ApiError(resp.status, body?.description || `HTTP ${resp.status}`);
  setConn(true);
  return body;
}

function setConn(up, why = "") {
  conn.className = `conn ${up ? "ok" : "bad"}`;
  setText(conn, up ? "● live" : `✗ ${why}`);
}

const path = (...parts) => parts.map(encodeURIComponent).join("/");

// Load, and render what changed, every POLL_MS until stopped; errors show in `problem`.
function poll(load, render, problem) {
  let timer;
  let stopped = false;
  let last;
  async function tick() {
    try {
      const data = await load();
      if (stopped) return;
      problem.hidden = true;
      const key = JSON.stringify(data);
      if (key !== last) {
        last = key;
        keepFocus(() => render(data));
      }
    } catch (err) {
      if (stopped) return;
      if (err.status === 0) setConn(false, "cannot reach Deployster; retrying");
      setText(problem, `Could not load: ${err.message}.`);
      problem.hidden = false;
    }
    if (!stopped) timer = setTimeout(tick, POLL_MS);
  }
  tick();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}

function problemBox() {
  return h("p", { class: "alert", role: "alert", hidden: true });
}

// -- views ---------------------------------------------------------------------------------

function page(title, crumbs, ...content) {
  document.title = `${title} · Deployster`;
  const heading = h("h1", { tabindex: "-1" }, title);
  const nav = crumbs.length
    ? [h("nav", { class: "crumbs", "aria-label": "Breadcrumb" }, h("ol", {}, crumbs.map((c) => h("li", {}, c))))]
    : [];
  main.replaceChildren(...nav, heading, ...content);
  return heading;
}

function instancesTable(service) {
  return table(
    `Instances of ${service.name}`,
    ["Instance", "Machine", "Health", "Routed", "Last probe"],
    service.instances.map((i) => [
      unitLabel(i.unit),
      machineLabel(i.machine),
      i.healthy ? pill("✓", "healthy", "ok") : pill("✗", "not healthy", "bad"),
      i.routed ? pill("→", "routed", "ok") : pill("–", "not routed", "neutral"),
      h("span", { class: "probe" }, i.last_probe),
    ]),
    "No instance is announced.",
  );
}

function releaseFacts(service) {
  const latest = service.latest_deploy;
  return facts([
    ["Live release", service.live
      ? [h("strong", {}, service.live.version), " ", h("span", { class: "muted" }, service.live.timestamp)]
      : h("span", { class: "muted" }, "none")],
    ["Latest deploy", [
      link(`#/services/${path(service.name, "deploys", latest.id)}`, latest.version), " ",
      stateBadge(latest.state),
    ]],
  ]);
}

function summarize(services) {
  const instances = services.flatMap((s) => s.instances);
  const healthy = instances.filter((i) => i.healthy).length;
  const inFlight = services.filter((s) => !FINAL.has(s.latest_deploy.state)).length;
  return [
    plural(services.length, "service"),
    `${plural(inFlight, "deploy")} in flight`,
    `${healthy} of ${plural(instances.length, "instance")} healthy`,
  ].join(" · ");
}

function overview() {
  const summary = h("p", { class: "summary", role: "status", "aria-live": "polite" });
  const problem = problemBox();
  const list = h("div", { class: "cards" });
  const heading = page("Services", [], summary, problem, list);
  const stop = poll(() => api("/v1/services"), ({ services }) => {
    setText(summary, summarize(services));
    list.replaceChildren(...(services.length
      ? services.map((s) => h("section", { class: "card", "aria-labelledby": `svc-${s.name}` },
        h("h2", { id: `svc-${s.name}` }, link(`#/services/${path(s.name)}`, s.name)),
        releaseFacts(s),
        instancesTable(s)))
      : [h("p", { class: "empty" }, "No service has been deployed yet. Deploy one with deployctl deploy <service> <version>.")]));
  }, problem);
  return { heading, stop };
}

function policyFacts(policy) {
  const hc = policy.health;
  const auto = policy.auto_deploy;
  return facts([
    ["Health check", `GET ${hc.path} every ${hc.interval} s, timeout ${hc.timeout} s`],
    ["Thresholds", `healthy after ${plural(hc.healthy_threshold, "pass", "passes")}, unhealthy after ${plural(hc.unhealthy_threshold, "failure")}`],
    ["Healthy for", `${policy.min_healthy_time} s before an instance counts as ready`],
    ["Deadlines", `${policy.instance_deadline} s per instance, ${policy.deploy_deadline} s per deploy`],
    ["Drain", `${policy.drain} s`],
    ["Instances", policy.instance_count ? String(policy.instance_count) : "as many as the running release (else 1)"],
    ["Auto deploy", auto.enabled
      ? `on push, tags: ${auto.policy}${auto.prerelease ? " (pre-releases too)" : ""}${auto.repository ? `, from ${auto.repository}` : ""}`
      : "off"],
    ["Exclusive tasks", policy.exclusive_tasks ? "yes" : "no"],
  ]);
}

function historyTable(name, deploys) {
  return table(
    `Deploys of ${name}, newest first`,
    ["Deploy", "Outcome", "Source", "Who", "Started", "Duration"],
    deploys.map((d) => [
      link(`#/services/${path(name, "deploys", d.id)}`, d.version),
      [stateBadge(d.state), d.error ? h("div", { class: "why" }, d.error) : null],
      sourceLabel(d.source),
      actorLabel(d.actor),
      when(d.created_at, shortTime),
      duration(d),
    ]),
    "No deploy is on record.",
  );
}

function webhookTable(name, log) {
  if (log === null) return h("p", { class: "empty" }, "This server takes no webhooks.");
  const mine = log.events.filter((e) => e.service === name).slice(0, 10);
  const empty = log.enabled.length
    ? `No push for ${name} among the last 100 webhook decisions.`
    : "No webhook source is configured (--webhook-secret).";
  return table(
    `Recent webhook decisions for ${name}, newest first`,
    ["When", "Source", "Tag", "Decision", "Reason"],
    mine.map((e) => [
      when(e.at, shortTime),
      e.source,
      e.tag || "—",
      e.deploy_id ? link(`#/services/${path(name, "deploys", e.deploy_id)}`, stateBadge(e.decision)) : stateBadge(e.decision),
      e.reason,
    ]),
    empty,
  );
}

// Ask first, then send; a refusal (400, 409, ...) is shown in `result`.
async function act(question, request, result, done) {
  if (!window.confirm(question)) {
    setText(result, "Cancelled: nothing was sent.");
    return;
  }
  setText(result, "Sending…");
  try {
    done(await request());
  } catch (err) {
    setText(result, `✗ ${err.message}`);
  }
}

const json = (body) => ({
  method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
});

// Deploy a version and roll back, with deployctl's requests (its defaults included).
function serviceActions(name) {
  const base = `/v1/services/${path(name)}`;
  const result = h("p", { class: "result", role: "status", "aria-live": "polite" });
  const version = h("input", { id: "deploy-version", required: true, autocomplete: "off", spellcheck: "false" });
  const count = h("input", { id: "deploy-count", type: "number", min: "0", max: "100", value: "0" });
  const replace = h("input", { id: "deploy-replace", type: "checkbox", checked: true });
  const follow = ({ deploy }) => {
    location.hash = `#/services/${path(name, "deploys", deploy.id)}`;
  };
  const deploy = (event) => {
    event.preventDefault();
    const wanted = version.value.trim();
    const body = { version: wanted, destroy_previous: replace.checked, instance_count: Number(count.value) || 0 };
    act(`Deploy ${wanted} of ${name}${replace.checked ? ", replacing the live release" : ""}?`,
      () => api(`${base}/deploys`, json({ deploy: body })), result, follow);
  };
  const rollback = () => act(`Roll ${name} back to the release before the live one?`,
    () => api(`${base}/rollback`, { method: "POST" }), result, follow);
  return h("details", { class: "actions" },
    h("summary", {}, "Actions"),
    h("form", { class: "deploy-form", onsubmit: deploy },
      h("div", {}, h("label", { for: "deploy-version" }, "Version"), version),
      h("div", {}, h("label", { for: "deploy-count" }, "Instances (0: as now)"), count),
      h("div", { class: "check" }, replace, h("label", { for: "deploy-replace" }, "Replace the live release")),
      h("button", { type: "submit" }, "Deploy…")),
    h("p", {}, h("button", { type: "button", class: "secondary", onclick: rollback }, "Roll back…")),
    result);
}

// Destroy the units of the deploy's release (deployctl destroy --timestamp).
function deployActions(name, current) {
  const result = h("p", { class: "result", role: "status", "aria-live": "polite" });
  const destroy = () => {
    const { version, timestamp } = current();
    act(`Destroy the units of ${name} ${version} (${timestamp})? Its instances stop serving.`,
      () => api(`/v1/services/${path(name, "deploys", version)}?timestamp=${encodeURIComponent(timestamp)}`, { method: "DELETE" }),
      result, () => setText(result, `✓ The units of ${version} (${timestamp}) are destroyed.`));
  };
  return h("details", { class: "actions" },
    h("summary", {}, "Actions"),
    h("p", {}, h("button", { type: "button", class: "danger", onclick: destroy }, "Destroy this release's units…")),
    result);
}

function serviceView(name) {
  const problem = problemBox();
  const now = h("div");
  const history = h("div");
  const policy = h("div");
  const hooks = h("div");
  const heading = page(name, [link("#/", "Services"), name], problem,
    h("section", { "aria-labelledby": "now" }, h("h2", { id: "now" }, "Now"), now, serviceActions(name)),
    h("section", { "aria-labelledby": "history" }, h("h2", { id: "history" }, "Deploys"), history),
    h("div", { class: "columns" },
      h("section", { "aria-labelledby": "policy" }, h("h2", { id: "policy" }, "Policy in force"), policy),
      h("section", { "aria-labelledby": "hooks" }, h("h2", { id: "hooks" }, "Webhook decisions"), hooks)));
  const base = `/v1/services/${path(name)}`;
  const stop = poll(
    () => Promise.all([
      api("/v1/services"),
      api(`${base}/deploys`),
      api(`${base}/policy`),
      api("/v1/webhooks/events").catch((err) => (err.status === 404 ? null : Promise.reject(err))),
    ]),
    ([list, deploys, pol, log]) => {
      const service = list.services.find((s) => s.name === name);
      now.replaceChildren(...(service
        ? [releaseFacts(service), instancesTable(service)]
        : [h("p", { class: "empty" }, `No deploy of ${name} is on record.`)]));
      history.replaceChildren(historyTable(name, deploys.deploys));
      policy.replaceChildren(policyFacts(pol.policy));
      hooks.replaceChildren(webhookTable(name, log));
    },
    problem,
  );
  return { heading, stop };
}

// The symbol and tone of each progress event's kind (the final ones are STATES).
const STEPS = {
  instance_healthy: ["✓", "ok"],
  instance_ready: ["✓", "ok"],
  routed: ["→", "ok"],
  rolling_back: ["↶", "warn"],
  resumed: ["↻", "busy"],
};

function eventItem(event) {
  const [symbol, tone] = STEPS[event.kind]
    ?? (STATES[event.kind] ? [STATES[event.kind][0], STATES[event.kind][2]] : ["•", "neutral"]);
  return h("li", { class: `event ${tone}`, "data-seq": event.seq },
    h("span", { class: "event-symbol", "aria-hidden": "true" }, symbol),
    when(event.at, timeOnly),
    h("span", { class: "kind" }, event.kind.replace(/_/g, " ")),
    h("span", { class: "message" }, event.message,
      event.unit ? [" ", h("span", { class: "muted" }, "(", unitLabel(event.unit), ")")] : null));
}

function deployView(name, id) {
  const problem = problemBox();
  const state = h("p", { class: "state", role: "status", "aria-live": "polite" });
  const summary = h("div");
  const failure = h("div", { class: "failure", role: "alert", hidden: true });
  const events = h("ol", { class: "events", role: "log", "aria-live": "polite", "aria-label": "Progress events" });
  const streamNote = h("p", { class: "muted stream" });
  let latest = null;
  const heading = page(`Deploy ${id}`, [link("#/", "Services"), link(`#/services/${path(name)}`, name), id],
    problem, state, failure, summary, deployActions(name, () => latest),
    h("section", { "aria-labelledby": "progress" }, h("h2", { id: "progress" }, "Progress"), streamNote, events));
  const url = `/v1/services/${path(name, "deploys", id)}`;
  const seen = new Set();
  let stopped = false;
  let source = null;
  let fallback = null;
  let refreshing = null;

  function addEvent(event) {
    if (seen.has(event.seq)) return;
    seen.add(event.seq);
    const item = eventItem(event);
    const after = [...events.children].find((li) => Number(li.dataset.seq) > event.seq);
    events.insertBefore(item, after ?? null);
  }

  function render(record) {
    latest = record;
    setText(heading, `Deploy of ${record.version}`);
    document.title = `${name} ${record.version} · Deployster`;
    state.replaceChildren(stateBadge(record.state),
      FINAL.has(record.state) ? "" : h("span", { class: "muted" }, ` step: ${record.step.replace(/_/g, " ")}`));
    failure.replaceChildren(...(record.error
      ? [h("h2", {}, record.state === "rolled_back" ? "Why it was rolled back" : "Why it failed"),
        h("p", { class: "reason" }, record.error)]
      : []));
    failure.hidden = !record.error;
    summary.replaceChildren(facts([
      ["Service", link(`#/services/${path(name)}`, name)],
      ["Version", h("strong", {}, record.version)],
      ["Source", sourceLabel(record.source)],
      ["Who", actorLabel(record.actor)],
      ["Started", when(record.created_at)],
      ["Finished", record.finished_at ? when(record.finished_at) : "not yet"],
      ["Duration", duration(record)],
      ["Instances", String(record.instance_count)],
      ["Units", record.units.length ? h("ul", { class: "plain" }, record.units.map((u) => h("li", {}, h("code", {}, u)))) : "none yet"],
      ["Replaces", record.previous_units.length ? h("ul", { class: "plain" }, record.previous_units.map((u) => h("li", {}, h("code", {}, u)))) : "nothing"],
    ]));
    record.events.forEach(addEvent);
  }

  async function refresh() {
    // One record read at a time; events that arrive meanwhile ask for one more.
    if (refreshing) {
      refreshing.again = true;
      return;
    }
    refreshing = { again: false };
    try {
      const record = (await api(url)).deploy;
      if (!stopped) keepFocus(() => render(record));
      problem.hidden = true;
      return record;
    } catch (err) {
      if (!stopped) {
        setText(problem, `Could not load the deploy: ${err.message}.`);
        problem.hidden = false;
        if (err.status === 0) setConn(false, "cannot reach Deployster; retrying");
      }
      return null;
    } finally {
      const again = refreshing.again;
      refreshing = null;
      if (again && !stopped) refresh();
    }
  }

  function follow() {
    setText(streamNote, "Following the deploy live.");
    source = new EventSource(`${url}/events`);
    source.onopen = () => setConn(true);
    const onEvent = (message) => {
      const event = JSON.parse(message.data);
      addEvent(event);
      if (FINAL.has(event.kind)) {
        source.close();
        setText(streamNote, "The deploy has ended.");
      }
      refresh();
    };
    for (const kind of KINDS) source.addEventListener(kind, onEvent);
    source.onmessage = onEvent;
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED) {
        // The stream was refused (not a dropped connection, which EventSource retries):
        // read the record instead until the deploy ends.
        setText(streamNote, "The live stream is unavailable; reading the record every few seconds.");
        fallback = setInterval(async () => {
          const record = await refresh();
          if (record && FINAL.has(record.state)) clearInterval(fallback);
        }, POLL_MS);
      } else {
        setConn(false, "stream interrupted; reconnecting");
      }
    };
  }

  refresh().then((record) => {
    if (stopped || !record) return;
    if (FINAL.has(record.state)) setText(streamNote, "The deploy has ended.");
    else follow();
  });
  return {
    heading,
    stop() {
      stopped = true;
      source?.close();
      clearInterval(fallback);
    },
  };
}

function notFound() {
  const heading = page("Not found", [link("#/", "Services")],
    h("p", {}, "This page does not exist. ", link("#/", "See every service"), "."));
  return { heading, stop() {} };
}

// -- routing -------------------------------------------------------------------------------

let current = null;

function route(moveFocus) {
  current?.stop();
  const parts = location.hash.replace(/^#\/?/, "").split("/").filter(Boolean);
  let names;
  try {
    names = parts.map(decodeURIComponent);
  } catch {
    names = null;
  }
  if (names && names.length === 0) current = overview();
  else if (names?.[0] === "services" && names.length === 2) current = serviceView(names[1]);
  else if (names?.[0] === "services" && names.length === 4 && names[2] === "deploys") {
    current = deployView(names[1], names[3]);
  } else current = notFound();
  if (moveFocus) current.heading.focus();
}

window.addEventListener("hashchange", () => route(true));
document.getElementById("zone").textContent = Intl.DateTimeFormat().resolvedOptions().timeZone;
api("/v1/version").then(
  (text) => { document.getElementById("version").textContent = `Deployster ${text.trim()}`; },
  () => {},
);
route(false);
