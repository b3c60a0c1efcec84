// vmreplica's dashboard: everything it shows and does goes through the management API
// (POST /v1/<method>, the same calls the CLI makes), over the page's own mutual-TLS connection.
"use strict";

const REFRESH_MS = 5000;
let selected = null;

async function api(method, args = {}) {
  const answer = await fetch(`/v1/${method}`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(args),
  });
  const body = await answer.json();
  if (!answer.ok) throw new Error(body.error ? body.error.message : answer.statusText);
  return body.result;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function ago(iso) {
  if (!iso) return "never";
  const seconds = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (seconds < 120) return `${Math.round(seconds)} s`;
  if (seconds < 7200) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function say(text, error = false) {
  const box = document.getElementById("message");
  box.textContent = text;
  box.className = error ? "error" : "";
  box.style.display = "block";
  setTimeout(() => { box.style.display = "none"; }, 6000);
}

// The actions a relationship allows, by its side and state: [label, method, arguments].
function actions(row, testing) {
  const vm = row.vm_name;
  if (row.mode === "Primary") {
    switch (row.state) {
      case "Replicating": return [
        ["Pause", "replication.suspend", { vm }],
        ["Planned failover", "failover.start", { vm, prepare: true }],
      ];
      case "Suspended": case "Error": return [["Resume", "replication.resume", { vm }]];
      case "WaitingForStartResynchronize":
        return [["Resynchronize", "replication.resume", { vm, resynchronize: true }]];
      case "Resynchronizing": return [["Pause", "replication.suspend", { vm }]];
      case "ResynchronizeSuspended":
        return [["Continue", "replication.resume", { vm, continue: true }]];
      case "PreparedForFailover": return [["Cancel planned failover", "failover.stop", { vm }]];
      default: return [];
    }
  }
  if (row.mode === "Replica" && row.state === "Replicating") {
    return testing
      ? [["Stop test failover", "failover.stop", { vm }]]
      : [["Test failover", "failover.start", { vm, as_test: true }]];
  }
  return [];
}

async function act(label, method, args) {
  if (!window.confirm(`${label}: ${args.vm} on this host?`)) return;
  try {
    await api(method, args);
    say(`${label}: ${args.vm} done`);
  } catch (e) {
    say(`${label}: ${e.message}`, true);
  }
  await refresh();
}

function chart(svg, values, failed, unit) {
  svg.replaceChildren();
  const ns = "http://www.w3.org/2000/svg";
  const add = (tag, attrs) => {
    const node = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    svg.append(node);
    return node;
  };
  const max = Math.max(...values, 1e-9);
  const left = 50, width = 540, height = 130, top = 10;
  add("text", { x: 4, y: top + 8, class: "axis" }).textContent = unit(max);
  add("text", { x: 4, y: top + height, class: "axis" }).textContent = "0";
  const step = width / Math.max(values.length, 1);
  values.forEach((v, i) => {
    const h = (v / max) * height;
    add("rect", {
      x: left + i * step + 1, y: top + height - h, width: Math.max(step - 2, 1), height: h,
      class: failed[i] ? "bar failed" : "bar",
    });
  });
  if (!values.length) add("text", { x: 250, y: 80, class: "axis" }).textContent = "no cycles yet";
}

async function showDetail(vm) {
  const cycles = await api("replication.cycles", { vm });
  document.getElementById("detail").hidden = false;
  document.getElementById("detail-vm").textContent = vm;
  chart(document.getElementById("chart-size"), cycles.map((c) => c.size),
        cycles.map((c) => !c.ok), bytes);
  chart(document.getElementById("chart-latency"), cycles.map((c) => c.latency_sec || 0),
        cycles.map((c) => !c.ok), (s) => `${s.toFixed(1)} s`);
}

async function refresh() {
  try {
    const [server, rows, measures, vms, events] = await Promise.all([
      api("server.get"), api("replication.get"), api("replication.measure"),
      api("vm.list"), api("event.list"),
    ]);
    document.getElementById("host").textContent = server.computer_name;
    document.getElementById("server").textContent = server.replication_enabled
      ? `replica server: certificate port ${server.certificate_authentication_port}`
      : "not a replica server";
    document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    const measured = Object.fromEntries(measures.map((m) => [m.vm_name, m]));
    const names = new Set(vms.map((v) => v.name));
    const body = document.querySelector("#vms tbody");
    body.replaceChildren();
    for (const row of rows) {
      const m = measured[row.vm_name] || {};
      const testing = names.has(`${row.vm_name} - Test`);
      const health = row.health || "none";
      const healthCell = el("td", {}, el("span", { class: `badge health-${health}`,
                                                   "data-health": health }, row.health || "–"));
      if ((m.health_details || []).length) {
        healthCell.append(el("ul", { class: "reasons" },
                             ...m.health_details.map((d) => el("li", {}, d))));
      }
      const stateCell = el("td", {}, row.state);
      if (testing) stateCell.append(el("br"), el("span", { class: "testing" }, "test failover in progress"));
      const buttons = actions(row, testing).map(([label, method, args]) =>
        el("button", { onclick: (e) => { e.stopPropagation(); act(label, method, args); } }, label));
      const tr = el("tr", { "data-vm": row.vm_name, class: row.vm_name === selected ? "selected" : "",
                            onclick: () => { selected = row.vm_name; refresh(); } },
        el("td", {}, row.vm_name), el("td", {}, row.mode), stateCell, healthCell,
        el("td", {}, row.last_replication_time ? new Date(row.last_replication_time).toLocaleString() : "never"),
        el("td", {}, ago(row.last_replication_time)),
        el("td", {}, bytes(m.pending_replication_size)),
        el("td", {}, ...buttons));
      body.append(tr);
    }
    document.getElementById("empty").hidden = rows.length > 0;
    const peers = {};
    for (const row of rows) {
      const peer = row.mode === "Primary" ? row.replica_server : row.primary_server;
      const role = row.mode === "Primary" ? "replica server" : "primary server";
      peers[peer] = peers[peer] || { role, vms: [] };
      peers[peer].vms.push(row.vm_name);
    }
    const hosts = document.querySelector("#hosts tbody");
    hosts.replaceChildren(el("tr", {}, el("td", {}, server.computer_name), el("td", {}, "this host"),
                             el("td", {}, String(vms.length))));
    for (const [name, peer] of Object.entries(peers)) {
      hosts.append(el("tr", {}, el("td", {}, name), el("td", {}, peer.role),
                      el("td", {}, peer.vms.join(", "))));
    }
    const list = document.getElementById("events");
    list.replaceChildren(...events.slice(-12).reverse().map((e) =>
      el("li", { class: e.level }, `${new Date(e.time).toLocaleTimeString()} ${e.message}`)));
    if (!selected && rows.length) selected = rows[0].vm_name;
    if (selected) await showDetail(selected);
    document.body.dataset.loaded = "1";
  } catch (e) {
    say(`cannot reach the agent: ${e.message}`, true);
  }
}

refresh();
setInterval(refresh, REFRESH_MS);
