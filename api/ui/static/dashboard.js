// sandboxd's dashboard, the browser side: the token, the live list, one sandbox's graph, logs,
// terminal and files. Every call carries the token as a header (EventSource cannot, so the
// event stream is read with fetch); the terminal's WebSocket offers it as a subprotocol.
// Nothing here puts the token in a URL.
(() => {
  "use strict";

  const ROOT = document.body.dataset.root || "";
  const TOKEN_KEY = "sandboxd.token";
  const POINTS = 90; // samples the graph keeps: 3 minutes at one every 2 s
  const $ = (id) => document.getElementById(id);

  const state = {
    token: sessionStorage.getItem(TOKEN_KEY),
    selected: null, // the id of the sandbox shown
    tab: "overview",
    stats: null, // {timer, plot, data, last}
    logs: null, // AbortController of the logs stream
    term: null, // {terminal, fit, socket}
    filesPath: "/",
  };

  // -- the token and authenticated calls ----------------------------------------------------

  function headers(extra) {
    const all = Object.assign({}, extra || {});
    if (state.token) all.Authorization = `Bearer ${state.token}`;
    return all;
  }

  class Unauthorized extends Error {}

  async function api(path, options = {}) {
    const response = await fetch(ROOT + path, { ...options, headers: headers(options.headers) });
    if (response.status === 401) {
      askToken(state.token ? "The daemon refused that token." : null);
      throw new Unauthorized();
    }
    return response;
  }

  async function problemText(response) {
    try {
      const body = await response.json();
      const issues = (body.errors || []).map((e) => `${e.loc.slice(1).join(".")}: ${e.msg}`);
      return [body.detail || body.title || response.statusText, ...issues].join(" · ");
    } catch {
      return `${response.status} ${response.statusText}`;
    }
  }

  function askToken(message) {
    const dialog = $("token-dialog");
    const error = $("token-error");
    error.hidden = !message;
    error.textContent = message || "";
    if (!dialog.open) dialog.showModal();
    $("token-input").focus();
  }

  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("token-input").value.trim();
    if (!value) return;
    state.token = value;
    sessionStorage.setItem(TOKEN_KEY, value);
    $("token-input").value = "";
    $("token-dialog").close();
    start();
  });
  $("token-dialog").addEventListener("cancel", (event) => event.preventDefault());

  $("forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    location.reload();
  });

  // htmx fetches the fragments: with the token, and a 401 asks for it again.
  document.body.addEventListener("htmx:configRequest", (event) => {
    if (state.token) event.detail.headers.Authorization = `Bearer ${state.token}`;
  });
  document.body.addEventListener("htmx:responseError", (event) => {
    const xhr = event.detail.xhr;
    if (xhr.status === 401) askToken("The daemon refused that token.");
    else if (event.detail.target && event.detail.target.id === "facts" && xhr.status === 404) {
      showGone();
    }
  });

  async function start() {
    let response;
    try {
      response = await fetch(`${ROOT}/info`, { headers: headers() });
    } catch {
      setLive("offline", "Daemon unreachable");
      setTimeout(start, 3000);
      return;
    }
    if (response.status === 401) {
      askToken(state.token ? "The daemon refused that token." : null);
      return;
    }
    const info = await response.json();
    $("forget").hidden = !state.token;
    $("footer").textContent = `sandboxd ${info.version} · kernel ${info.kernel} · cgroup ${info.cgroup || "?"}`;
    refreshList();
    followEvents();
    route();
  }

  // -- live: the event stream, or polling when the daemon has none ---------------------------

  function setLive(kind, words) {
    const live = $("live");
    live.dataset.state = kind;
    live.textContent = words;
  }

  function refreshList() {
    htmx.trigger(document.body, "sandboxes-changed");
  }

  function refreshFacts() {
    if (!state.selected) return;
    htmx.ajax("GET", `${ROOT}/ui/fragments/sandboxes/${encodeURIComponent(state.selected)}`, {
      target: "#facts",
      swap: "innerHTML",
    });
  }

  let following = false;
  async function followEvents() {
    if (following) return;
    following = true;
    let lastId = null;
    for (;;) {
      let response;
      try {
        const extra = { Accept: "text/event-stream" };
        if (lastId !== null) extra["Last-Event-ID"] = lastId;
        response = await api("/events?type=sandbox", { headers: extra });
      } catch (error) {
        if (error instanceof Unauthorized) { following = false; return; }
        setLive("offline", "Reconnecting…");
        await sleep(3000);
        continue;
      }
      if (response.status === 404) return poll(); // a daemon without /events
      if (!response.ok) { await sleep(3000); continue; }
      setLive("live", "Live");
      refreshList(); // what happened while the stream was down
      try {
        for await (const event of serverSentEvents(response.body)) {
          if (event.id) lastId = event.id;
          if (event.data) onEvent(event.type, JSON.parse(event.data));
        }
      } catch {
        // dropped (a slow reader is cut off by the daemon): reconnect from lastId
      }
      setLive("offline", "Reconnecting…");
      await sleep(1000);
    }
  }

  async function* serverSentEvents(body) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const event = { id: null, type: "message", data: "" };
        for (const line of block.split("\n")) {
          if (!line || line.startsWith(":")) continue;
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "id") event.id = text;
          else if (field === "event") event.type = text;
          else if (field === "data") event.data += (event.data ? "\n" : "") + text;
        }
        yield event;
      }
    }
  }

  function onEvent(type, data) {
    refreshList();
    if (data.sandbox_id && data.sandbox_id === state.selected) {
      if (type === "sandbox.destroyed") showGone();
      else refreshFacts();
    }
  }

  async function poll() {
    setLive("polling", "Polling");
    for (;;) {
      await sleep(2000);
      refreshList();
      if (state.selected) refreshFacts();
    }
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  // -- the list and the selection ------------------------------------------------------------

  document.body.addEventListener("htmx:afterSwap", (event) => {
    if (event.detail.target.id === "sandbox-list") {
      const count = event.detail.target.querySelector("template[data-count]");
      $("count").textContent = count ? `${count.dataset.count}` : "";
      markSelected();
    }
    if (event.detail.target.id === "facts") {
      const head = $("facts").querySelector(".facts-head");
      if (head && head.dataset.state !== "running") stopStats(true);
    }
  });

  function markSelected() {
    for (const row of document.querySelectorAll(".sandbox-row")) {
      row.setAttribute("aria-current", String(row.dataset.id === state.selected));
    }
  }

  function route() {
    const match = location.hash.match(/^#\/sandboxes\/([^/]+)$/);
    select(match ? decodeURIComponent(match[1]) : null);
  }
  window.addEventListener("hashchange", route);

  function select(id) {
    if (id === state.selected) return;
    closeSandbox();
    state.selected = id;
    markSelected();
    $("detail").hidden = !id;
    $("placeholder").hidden = Boolean(id);
    if (!id) {
      $("facts").replaceChildren();
      return;
    }
    $("facts").innerHTML = '<p class="muted">Loading…</p>';
    refreshFacts();
    state.filesPath = "/";
    $("files-path").value = "/";
    showTab(state.tab);
    if (window.matchMedia("(max-width: 760px)").matches) {
      $("detail").scrollIntoView({ behavior: "smooth", block: "start" });
    }
  }

  function closeSandbox() {
    stopStats(false);
    stopLogs();
    stopTerminal();
    $("files-body").innerHTML = "";
    $("files-status").textContent = "";
    $("logs").textContent = "";
    $("usage").innerHTML = "";
  }

  function showGone() {
    $("facts").innerHTML = '<p class="muted">This sandbox has been deleted.</p>';
    stopStats(true);
    stopTerminal();
  }

  // -- tabs ----------------------------------------------------------------------------------

  const TABS = ["overview", "terminal", "logs", "files"];
  for (const name of TABS) $(`tab-${name}`).addEventListener("click", () => showTab(name));
  document.querySelector(".tabs").addEventListener("keydown", (event) => {
    const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
    if (!step) return;
    const next = TABS[(TABS.indexOf(state.tab) + step + TABS.length) % TABS.length];
    showTab(next);
    $(`tab-${next}`).focus();
  });

  function showTab(name) {
    state.tab = name;
    for (const other of TABS) {
      $(`tab-${other}`).setAttribute("aria-selected", String(other === name));
      $(`tab-${other}`).tabIndex = other === name ? 0 : -1;
      $(`panel-${other}`).hidden = other !== name;
    }
    if (!state.selected) return;
    if (name === "overview") startStats();
    if (name === "logs" && !state.logs) startLogs();
    if (name === "files") listFiles(state.filesPath);
    if (name === "terminal" && state.term) state.term.fit.fit();
  }

  // -- create and delete ---------------------------------------------------------------------

  $("create-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = event.target;
    const error = $("create-error");
    const body = { network: { mode: form.network.value }, limits: {} };
    if (form.name.value.trim()) body.name = form.name.value.trim();
    if (form.cmd.value.trim()) body.cmd = ["sh", "-c", form.cmd.value.trim()];
    if (form.memory.value) body.limits.memory_bytes = Math.round(Number(form.memory.value) * 1048576);
    if (form.ttl.value) body.ttl_seconds = Number(form.ttl.value);
    $("create-submit").disabled = true;
    $("create-submit").textContent = "Creating…";
    try {
      const response = await api("/sandboxes", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
      if (response.status !== 201) {
        error.textContent = await problemText(response);
        error.hidden = false;
        return;
      }
      const sandbox = await response.json();
      error.hidden = true;
      form.reset();
      refreshList();
      location.hash = `#/sandboxes/${sandbox.id}`;
    } catch (failure) {
      if (!(failure instanceof Unauthorized)) {
        error.textContent = `Could not reach the daemon: ${failure.message}`;
        error.hidden = false;
      }
    } finally {
      $("create-submit").disabled = false;
      $("create-submit").textContent = "Create sandbox";
    }
  });

  // Delete asks twice, in place: the first click arms the button for a few seconds.
  document.body.addEventListener("click", async (event) => {
    const button = event.target.closest("[data-action=delete]");
    if (!button) return;
    if (!button.classList.contains("confirming")) {
      button.classList.add("confirming");
      button.textContent = "Delete for good?";
      setTimeout(() => {
        button.classList.remove("confirming");
        button.textContent = "Delete";
      }, 4000);
      return;
    }
    button.disabled = true;
    button.textContent = "Deleting…";
    const response = await api(`/sandboxes/${encodeURIComponent(button.dataset.id)}`, { method: "DELETE" });
    if (response.status === 204 || response.status === 404) {
      refreshList();
      location.hash = "";
    } else {
      button.disabled = false;
      button.textContent = "Delete";
      button.classList.remove("confirming");
      $("facts").insertAdjacentHTML("beforeend", `<p class="error" role="alert"></p>`);
      $("facts").lastElementChild.textContent = await problemText(response);
    }
  });

  // -- the CPU and memory graph --------------------------------------------------------------

  function cssColor(name) {
    return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  }

  function startStats() {
    if (state.stats && state.stats.timer) return;
    if (!state.stats) state.stats = { plot: null, data: [[], [], []], last: null, timer: null };
    sample();
    state.stats.timer = setInterval(sample, 2000);
  }

  function stopStats(keepPlot) {
    if (!state.stats) return;
    clearInterval(state.stats.timer);
    state.stats.timer = null;
    if (!keepPlot) {
      if (state.stats.plot) state.stats.plot.destroy();
      state.stats = null;
    }
  }

  async function sample() {
    const stats = state.stats;
    const id = state.selected;
    if (!stats || !id) return;
    let response;
    try {
      response = await api(`/sandboxes/${encodeURIComponent(id)}/stats`);
    } catch {
      return;
    }
    if (state.stats !== stats) return; // another sandbox was picked meanwhile
    if (response.status === 409) {
      $("usage").innerHTML = '<div><dt>Usage</dt><dd class="muted">not running</dd></div>';
      stopStats(true);
      return;
    }
    if (!response.ok) return;
    const now = Date.now() / 1000;
    const usage = await response.json();
    let cpu = null;
    if (stats.last && usage.cpu_seconds !== null) {
      cpu = (100 * (usage.cpu_seconds - stats.last.cpu)) / Math.max(now - stats.last.time, 0.001);
    }
    stats.last = { cpu: usage.cpu_seconds, time: now };
    const memory = usage.memory_current_bytes === null ? null : usage.memory_current_bytes / 1048576;
    for (const [series, value] of [[0, now], [1, cpu], [2, memory]]) {
      stats.data[series].push(value);
      if (stats.data[series].length > POINTS) stats.data[series].shift();
    }
    drawUsage(usage, cpu);
    if (!stats.plot) stats.plot = makePlot(stats.data);
    else stats.plot.setData(stats.data);
  }

  function drawUsage(usage, cpu) {
    const mib = (bytes) => (bytes === null ? "—" : `${(bytes / 1048576).toFixed(1)} MiB`);
    const facts = [
      ["CPU", cpu === null ? "—" : `${cpu.toFixed(1)} %`],
      ["Memory", mib(usage.memory_current_bytes)],
      ["Memory peak", mib(usage.memory_peak_bytes)],
      ["Processes", usage.pids_current ?? "—"],
      ["OOM kills", usage.oom_kills ?? "—"],
    ];
    const list = $("usage");
    list.replaceChildren(
      ...facts.map(([name, value]) => {
        const item = document.createElement("div");
        const term = document.createElement("dt");
        const data = document.createElement("dd");
        term.textContent = name;
        data.textContent = value;
        item.append(term, data);
        return item;
      }),
    );
  }

  function makePlot(data) {
    const box = $("graph");
    const grid = { stroke: cssColor("--border"), width: 1 };
    const axis = (scale, side, format) => ({
      scale, side, grid: side === 3 ? grid : { show: false }, stroke: cssColor("--muted"),
      ticks: { show: false }, values: (_, ticks) => ticks.map(format), size: side === 1 ? 64 : 46,
    });
    const plot = new uPlot(
      {
        width: box.clientWidth || 600,
        height: 220,
        legend: { show: false },
        cursor: { drag: { x: false, y: false } },
        scales: { cpu: { range: (_, __, max) => [0, Math.max(100, max || 0)] }, mem: { range: (_, __, max) => [0, Math.max(8, (max || 0) * 1.2)] } },
        series: [
          {},
          { label: "CPU %", scale: "cpu", stroke: cssColor("--cpu"), width: 2, fill: cssColor("--cpu") + "22", spanGaps: true },
          { label: "Memory MiB", scale: "mem", stroke: cssColor("--mem"), width: 2, spanGaps: true },
        ],
        axes: [
          {
            stroke: cssColor("--muted"), grid: { show: false }, ticks: { show: false },
            space: 70, incrs: [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1800, 3600],
            values: (_, ticks) => ticks.map((t) => new Date(t * 1000).toTimeString().slice(0, 8)),
          },
          axis("cpu", 3, (v) => `${v}%`),
          axis("mem", 1, (v) => `${+v.toFixed(1)} MiB`),
        ],
      },
      data,
      box,
    );
    new ResizeObserver(() => plot.setSize({ width: box.clientWidth, height: 220 })).observe(box);
    return plot;
  }

  // -- main-command logs ---------------------------------------------------------------------

  async function startLogs() {
    const id = state.selected;
    const controller = new AbortController();
    state.logs = controller;
    const out = $("logs");
    out.textContent = "";
    $("logs-status").textContent = "Following…";
    let response;
    try {
      response = await api(`/sandboxes/${encodeURIComponent(id)}/logs?follow=true&tail=1000`, {
        signal: controller.signal,
      });
    } catch {
      return;
    }
    if (!response.ok) {
      $("logs-status").textContent = `No logs: ${await problemText(response)}`;
      return;
    }
    try {
      for await (const line of ndjson(response.body)) {
        const stuck = out.scrollTop + out.clientHeight >= out.scrollHeight - 4;
        const span = document.createElement("span");
        if (line.stream === "stderr") span.className = "stderr";
        span.textContent = line.data;
        out.append(span);
        if (stuck) out.scrollTop = out.scrollHeight;
      }
      if (state.logs === controller) $("logs-status").textContent = "The command has ended.";
    } catch {
      // aborted: another sandbox was picked
    }
  }

  function stopLogs() {
    if (state.logs) state.logs.abort();
    state.logs = null;
    $("logs-status").textContent = "";
  }

  async function* ndjson(body) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, end).trim();
        buffer = buffer.slice(end + 1);
        if (line) yield JSON.parse(line);
      }
    }
    if (buffer.trim()) yield JSON.parse(buffer);
  }

  // -- the terminal: a TTY exec over the attach WebSocket ------------------------------------

  function base64url(text) {
    const bytes = new TextEncoder().encode(text);
    let binary = "";
    for (const byte of bytes) binary += String.fromCharCode(byte);
    return btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  function terminalTheme() {
    return { background: cssColor("--term-bg"), foreground: cssColor("--term-fg"), cursor: cssColor("--accent") };
  }

  async function startTerminal() {
    const id = state.selected;
    const status = $("term-status");
    $("term-start").disabled = true;
    if (!state.term) {
      const terminal = new Terminal({
        fontFamily: cssColor("--mono"), fontSize: 13, cursorBlink: true, theme: terminalTheme(),
        scrollback: 5000,
      });
      const fit = new FitAddon.FitAddon();
      terminal.loadAddon(fit);
      $("terminal").replaceChildren();
      terminal.open($("terminal"));
      fit.fit();
      state.term = { terminal, fit, socket: null, observer: null };
      state.term.observer = new ResizeObserver(() => {
        if (!$("panel-terminal").hidden) fit.fit();
      });
      state.term.observer.observe($("terminal"));
      terminal.onData((data) => send({ stdin: data }));
      terminal.onResize(({ rows, cols }) => send({ resize: { rows, cols } }));
    }
    const { terminal } = state.term;
    status.textContent = "Starting a shell…";
    let response;
    try {
      response = await api(`/sandboxes/${encodeURIComponent(id)}/exec`, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({
          cmd: ["sh", "-c", 'exec "$(command -v bash || echo sh)" -i'],
          env: { TERM: "xterm-256color" },
          tty: true,
          wait: false,
          tty_size: { rows: terminal.rows, cols: terminal.cols },
        }),
      });
    } catch {
      $("term-start").disabled = false;
      return;
    }
    if (response.status !== 202) {
      status.textContent = await problemText(response);
      $("term-start").disabled = false;
      return;
    }
    const execution = await response.json();
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const url = `${scheme}//${location.host}${ROOT}/sandboxes/${encodeURIComponent(id)}/execs/${execution.id}/attach`;
    const protocols = ["sandboxd"];
    if (state.token) protocols.push(`bearer.${base64url(state.token)}`);
    const socket = new WebSocket(url, protocols);
    state.term.socket = socket;
    socket.onopen = () => {
      status.textContent = "Connected";
      $("term-start").hidden = true;
      $("term-stop").hidden = false;
      send({ resize: { rows: terminal.rows, cols: terminal.cols } });
      terminal.focus();
    };
    socket.onmessage = (message) => {
      const event = JSON.parse(message.data);
      if (event.data !== undefined) terminal.write(event.data);
      else if (event.exit) {
        const end = event.exit;
        status.textContent = end.signal ? `Ended by ${end.signal}` : `Exited with ${end.exit_code}`;
      } else if (event.error) status.textContent = event.error.detail;
    };
    socket.onclose = () => {
      if (state.term && state.term.socket === socket) {
        state.term.socket = null;
        $("term-start").hidden = false;
        $("term-start").disabled = false;
        $("term-start").textContent = "Open another shell";
        $("term-stop").hidden = true;
        if (status.textContent === "Connected") status.textContent = "Disconnected";
      }
    };
  }

  function send(message) {
    const socket = state.term && state.term.socket;
    if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(message));
  }

  function stopTerminal() {
    if (!state.term) return;
    const { socket, terminal, observer } = state.term;
    if (socket && socket.readyState === WebSocket.OPEN) {
      socket.send(JSON.stringify({ eof: true })); // the shell reads end of file and exits
      socket.close();
    }
    observer.disconnect();
    terminal.dispose();
    state.term = null;
    $("terminal").replaceChildren();
    $("term-start").hidden = false;
    $("term-start").disabled = false;
    $("term-start").textContent = "Open a shell";
    $("term-stop").hidden = true;
    $("term-status").textContent = "";
  }

  $("term-start").addEventListener("click", startTerminal);
  $("term-stop").addEventListener("click", () => {
    send({ eof: true });
    if (state.term && state.term.socket) state.term.socket.close();
  });

  // -- files ---------------------------------------------------------------------------------

  function joinPath(directory, name) {
    return `${directory.replace(/\/+$/, "")}/${name}`;
  }

  async function listFiles(path) {
    const id = state.selected;
    const status = $("files-status");
    status.textContent = "Loading…";
    const response = await api(
      `/sandboxes/${encodeURIComponent(id)}/files/list?path=${encodeURIComponent(path)}`,
    );
    if (id !== state.selected) return;
    if (!response.ok) {
      status.textContent = `Cannot list ${path}: ${await problemText(response)}`;
      $("files-body").replaceChildren();
      return;
    }
    state.filesPath = path;
    $("files-path").value = path;
    const { items } = await response.json();
    status.textContent = items.length ? "" : "This folder is empty.";
    const rows = items
      .filter((entry) => entry.path !== path)
      .sort((a, b) => (a.type === "dir") === (b.type === "dir") ? a.name.localeCompare(b.name) : a.type === "dir" ? -1 : 1)
      .map(fileRow);
    $("files-body").replaceChildren(...rows);
  }

  function fileRow(entry) {
    const row = document.createElement("tr");
    const name = document.createElement("td");
    const size = document.createElement("td");
    const mode = document.createElement("td");
    const actions = document.createElement("td");
    size.className = "num";
    mode.className = "mode";
    mode.textContent = entry.mode;
    if (entry.type === "dir") {
      const open = document.createElement("button");
      open.type = "button";
      open.className = "dir-link";
      open.textContent = `${entry.name}/`;
      open.addEventListener("click", () => listFiles(entry.path));
      name.append(open);
    } else {
      name.textContent = entry.type === "symlink" ? `${entry.name} → ${entry.target}` : entry.name;
      size.textContent = formatSize(entry.size);
      if (entry.type === "file") {
        const download = document.createElement("button");
        download.type = "button";
        download.textContent = "Download";
        download.setAttribute("aria-label", `Download ${entry.name}`);
        download.addEventListener("click", () => downloadFile(entry));
        actions.append(download);
      }
    }
    row.append(name, size, mode, actions);
    return row;
  }

  function formatSize(bytes) {
    if (bytes === null || bytes === undefined) return "";
    const units = ["B", "KiB", "MiB", "GiB"];
    let value = bytes;
    let unit = 0;
    while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
    return unit ? `${value.toFixed(1)} ${units[unit]}` : `${value} B`;
  }

  async function downloadFile(entry) {
    const response = await api(
      `/sandboxes/${encodeURIComponent(state.selected)}/files?path=${encodeURIComponent(entry.path)}`,
    );
    if (!response.ok) {
      $("files-status").textContent = await problemText(response);
      return;
    }
    const link = document.createElement("a");
    link.href = URL.createObjectURL(await response.blob());
    link.download = entry.name;
    link.click();
    setTimeout(() => URL.revokeObjectURL(link.href), 10000);
  }

  $("files-path-form").addEventListener("submit", (event) => {
    event.preventDefault();
    listFiles($("files-path").value.trim() || "/");
  });
  $("files-up").addEventListener("click", () => {
    const parent = state.filesPath.replace(/\/+$/, "").replace(/\/[^/]*$/, "") || "/";
    listFiles(parent);
  });
  $("files-upload").addEventListener("change", async (event) => {
    const file = event.target.files[0];
    if (!file) return;
    const path = joinPath(state.filesPath, file.name);
    $("files-status").textContent = `Uploading ${file.name}…`;
    const response = await api(
      `/sandboxes/${encodeURIComponent(state.selected)}/files?path=${encodeURIComponent(path)}`,
      { method: "PUT", headers: { "Content-Type": "application/octet-stream" }, body: file },
    );
    event.target.value = "";
    if (!response.ok) {
      $("files-status").textContent = `Upload failed: ${await problemText(response)}`;
      return;
    }
    await listFiles(state.filesPath);
    $("files-status").textContent = `Uploaded ${file.name}.`;
  });

  // htmx wires the hx- attributes when the document is parsed: start after it.
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
