// comfyui-xdit front end: pool settings (defaults for new "xDiT GPU Pool" nodes) and a pool status tab.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const SETTING_ADDRESS = "xDiT.Pool.RayAddress";
const SETTING_INTERFACE = "xDiT.Pool.NetworkInterface";
const SETTING_GPUS = "xDiT.Pool.GPUs";
const STATUS_ROUTE = "/xdit/pool/status";

function setting(id) {
  const store = app.extensionManager?.setting;
  if (store?.get) return store.get(id);
  return app.ui?.settings?.getSettingValue?.(id);
}

// New XDiTPool nodes start from the settings; loaded workflows keep their saved values.
function applyPoolDefaults(node) {
  const defaults = { ray_address: setting(SETTING_ADDRESS), network_interface: setting(SETTING_INTERFACE),
    gpus: setting(SETTING_GPUS) };
  for (const widget of node.widgets ?? []) {
    const value = defaults[widget.name];
    const unset = !widget.value || (widget.name === "gpus" && widget.value === "auto");
    if (typeof value === "string" && value.trim() && unset) widget.value = value.trim();
  }
}

function cell(text) {
  const td = document.createElement("td");
  td.textContent = text ?? "";
  td.style.padding = "2px 6px";
  return td;
}

function table(headers, rows) {
  const el = document.createElement("table");
  el.className = "xdit-status-table";
  el.style.borderCollapse = "collapse";
  const head = document.createElement("tr");
  headers.forEach((h) => {
    const th = cell(h);
    th.style.fontWeight = "bold";
    head.appendChild(th);
  });
  el.appendChild(head);
  rows.forEach((row) => {
    const tr = document.createElement("tr");
    row.forEach((v) => tr.appendChild(cell(v === undefined || v === null ? "" : String(v))));
    el.appendChild(tr);
  });
  return el;
}

// The status route returns {pools: [{address, network_interface, status: {hosts, ranks, ...} | error}]}.
function renderPool(pool) {
  const box = document.createElement("div");
  box.className = "xdit-pool";
  box.style.marginBottom = "12px";
  const title = document.createElement("div");
  title.style.fontWeight = "bold";
  title.textContent = `Pool: ${pool.address}` + (pool.network_interface ? ` via ${pool.network_interface}` : "");
  box.appendChild(title);
  if (pool.error) {
    const err = document.createElement("div");
    err.style.color = "var(--error-text, #f66)";
    err.textContent = pool.error;
    box.appendChild(err);
    return box;
  }
  const status = pool.status ?? {};
  const state = document.createElement("div");
  state.className = "xdit-pool-state";
  state.textContent = `state: ${status.running ? "running " + status.running : "idle"}, ${status.queued ?? 0} queued` +
    (status.layout ? `; layout ${status.layout}` : "") + (status.auth ? `; auth ${status.auth}` : "") +
    (status.gpus ? `; GPUs ${status.gpus}` : "");
  box.appendChild(state);
  const hosts = status.hosts ?? [];
  if (hosts.length) {
    box.appendChild(table(["host", "GPUs", "CPUs", "alive"],
      hosts.map((h) => [h.address + (h.is_head ? " (head)" : ""), h.gpus, h.cpus, h.alive])));
  }
  const ranks = status.ranks ?? [];
  box.appendChild(ranks.length
    ? table(["rank", "host", "device", "state", "model"],
      ranks.map((r) => [r.rank, r.host, r.device, r.state, r.model]))
    : Object.assign(document.createElement("div"), { textContent: "No ranks yet (they start with the first job)." }));
  return box;
}

async function refreshStatus(container) {
  container.textContent = "Loading...";
  try {
    const resp = await api.fetchApi(STATUS_ROUTE);
    const data = await resp.json();
    container.textContent = "";
    if (!data.pools?.length) {
      container.textContent = "No xDiT pool is running. Queue a workflow with an xDiT GPU Pool node to start one.";
      return;
    }
    data.pools.forEach((pool) => container.appendChild(renderPool(pool)));
  } catch (err) {
    container.textContent = `Pool status unavailable: ${err}`;
  }
}

function renderStatusTab(el) {
  el.textContent = "";
  const root = document.createElement("div");
  root.className = "xdit-status";
  root.style.padding = "10px";
  const header = document.createElement("h3");
  header.textContent = "xDiT pool";
  const button = document.createElement("button");
  button.textContent = "Refresh";
  button.className = "xdit-refresh";
  const body = document.createElement("div");
  body.className = "xdit-status-body";
  body.style.marginTop = "8px";
  button.addEventListener("click", () => refreshStatus(body));
  root.append(header, button, body);
  el.appendChild(root);
  refreshStatus(body);
}

app.registerExtension({
  name: "comfyui-xdit",
  settings: [
    {
      id: SETTING_ADDRESS,
      category: ["xDiT", "Pool", "Ray address"],
      name: "Ray address (HOST:PORT of `ray start --head`; blank = embedded local pool)",
      tooltip: "Default ray_address of new xDiT GPU Pool nodes.",
      type: "text",
      defaultValue: "",
    },
    {
      id: SETTING_INTERFACE,
      category: ["xDiT", "Pool", "Network interface"],
      name: "Network interface for NCCL/gloo between hosts (e.g. eth0; blank = automatic)",
      tooltip: "Default network_interface of new xDiT GPU Pool nodes.",
      type: "text",
      defaultValue: "",
    },
    {
      id: SETTING_GPUS,
      category: ["xDiT", "Pool", "GPUs"],
      name: "GPUs of the embedded pool (auto = all but ComfyUI's own GPU when there are others; all; or 1,2,3)",
      tooltip: "Default gpus of new xDiT GPU Pool nodes.",
      type: "text",
      defaultValue: "auto",
    },
  ],
  async setup() {
    app.extensionManager?.registerSidebarTab?.({
      id: "xdit-pool-status",
      icon: "pi pi-server",
      title: "xDiT",
      tooltip: "xDiT pool status: hosts, devices, ranks",
      type: "custom",
      render: renderStatusTab,
    });
  },
  nodeCreated(node) {
    if (node.comfyClass === "XDiTPool") applyPoolDefaults(node);
  },
});
