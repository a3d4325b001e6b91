/* Live admin console: one websocket to /ws/cluster/, updating in place every
 * element that carries data-gpu / data-node / data-task / data-tenant and the
 * cluster grid (#cluster-grid). Reconnects with backoff; frames are already
 * coalesced by the server (a few per second at most). */
(function () {
  "use strict";
  var gpus = {};          // id -> row, for the grid
  var nodes = {};         // id -> row
  var retry = 500;
  // Django's JavaScript catalogue (/jsi18n/, loaded before this file) when present.
  var gettext = window.gettext || function (s) { return s; };
  var gettext_noop = function (s) { return s; };
  function t(s) { return gettext(s); }
  // Words that arrive as data (GPU states: nodes.gpu_state.GPUState; server statuses): marked here
  // so the catalogue has them.
  void [gettext_noop("free"), gettext_noop("allocated"), gettext_noop("cordoned"), gettext_noop("reserved"),
        gettext_noop("error"), gettext_noop("unavailable"), gettext_noop("active"), gettext_noop("draining"),
        gettext_noop("maintenance"), gettext_noop("offline")];

  function mb(v) { return v >= 1024 ? (v / 1024).toFixed(1) + " GB" : v + " MB"; }
  function $all(sel) { return Array.prototype.slice.call(document.querySelectorAll(sel)); }
  function setText(el, value) {
    var text = value === null || value === undefined ? "" : String(value);
    if (el.textContent !== text) { el.textContent = text; flash(el); }
  }
  function flash(el) {
    el.classList.remove("live-flash"); void el.offsetWidth; el.classList.add("live-flash");
  }

  function updateGpuRow(g) {
    $all('[data-gpu="' + g.id + '"]').forEach(function (el) {
      var field = el.getAttribute("data-field");
      if (field === "memory") {
        var bar = el.querySelector(".membar-fill");
        if (bar) bar.style.width = g.memory_pct + "%";
        var label = el.querySelector(".membar-label");
        if (label) setText(label, mb(g.memory_used_mb) + " / " + mb(g.memory_total_mb));
      } else if (field === "state") {
        el.className = "gpu-state state-" + g.state;
        setText(el, t(g.state));
      } else if (field in g) {
        setText(el, g[field]);
      }
    });
  }

  function updateNodeRow(n) {
    $all('[data-node="' + n.id + '"]').forEach(function (el) {
      var field = el.getAttribute("data-field");
      if (field === "heartbeat") {
        setText(el, n.heartbeat_age_s === null ? gettext("never")
          : window.interpolate ? interpolate(gettext("%(s)s s ago"), {s: Math.round(n.heartbeat_age_s)}, true)
          : Math.round(n.heartbeat_age_s) + " s ago");
        el.style.color = n.heartbeat_overdue ? "#c00" : "";
      } else if (field === "status") {
        el.className = "node-status status-" + n.status;
        setText(el, t(n.status));
      } else if (field in n) {
        setText(el, n[field]);
      }
    });
  }

  function updateTaskRow(t) {
    $all('[data-task="' + t.id + '"]').forEach(function (el) {
      var field = el.getAttribute("data-field");
      if (field === "status") {
        el.className = "task-status status-" + t.status;
        setText(el, t.status_label);
      } else if (field in t) {
        setText(el, t[field]);
        if (el.classList.contains("trunc")) el.title = el.textContent;  // the full text on hover
      }
    });
  }

  function updateUsage(u) {
    $all('[data-tenant="' + u.id + '"]').forEach(function (el) {
      var key = el.getAttribute("data-usage");
      if (key && key in u.used) {
        setText(el, u.used[key] + (el.getAttribute("data-unit") || "") + (el.getAttribute("data-suffix") || ""));
      }
    });
  }

  function renderGrid() {
    var grid = document.getElementById("cluster-grid");
    if (!grid) return;
    var byNode = {};
    Object.keys(gpus).forEach(function (id) {
      var g = gpus[id];
      (byNode[g.node_id] = byNode[g.node_id] || []).push(g);
    });
    var ids = Object.keys(nodes).sort(function (a, b) { return nodes[a].name < nodes[b].name ? -1 : 1; });
    var html = ids.map(function (nid) {
      var n = nodes[nid];
      var cells = (byNode[nid] || []).sort(function (a, b) { return a.index - b.index; }).map(function (g) {
        // Tenant hues come from the server (portal.livedata.TENANT_HUES): never a state's colour.
        var style = g.state === "allocated" && g.tenant_hue !== null ? ' style="background:hsl(' + g.tenant_hue + ',65%,55%)"' : "";
        var title = [n.name + ":" + g.index, g.model, t(g.state), g.task, g.tenant,
                     g.utilization_pct + "% " + gettext("util"), mb(g.memory_used_mb) + " / " + mb(g.memory_total_mb),
                     g.temperature_c + " °C"].filter(Boolean).join("\n");
        return '<div class="gpu-cell state-' + g.state + '" data-gpu-cell="' + g.id + '"' + style +
               ' title="' + escapeHtml(title) + '"><b>' + g.index + "</b><span>" + g.utilization_pct +
               "%</span><small>" + escapeHtml(g.tenant || t(g.state)) + "</small></div>";
      }).join("");
      return '<div class="grid-node" data-grid-node="' + nid + '"><h3>' + escapeHtml(n.name) +
             ' <span class="node-status status-' + n.status + '">' + escapeHtml(t(n.status)) + "</span></h3>" +
             '<div class="grid-cells">' + cells + "</div></div>";
    }).join("");
    grid.innerHTML = html || "<p>" + escapeHtml(gettext("No GPU servers yet.")) + "</p>";
  }

  function escapeHtml(s) {
    return String(s).replace(/[&<>"']/g, function (c) {
      return {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c];
    });
  }

  function showAlert(a) {
    var box = document.getElementById("live-alerts");
    if (!box) {
      box = document.createElement("div");
      box.id = "live-alerts";
      document.body.insertBefore(box, document.body.firstChild);
    }
    var div = document.createElement("div");
    div.className = "live-alert severity-" + a.severity;
    div.textContent = "[" + a.severity + "] " + a.message;
    box.appendChild(div);
  }

  function onFrame(frame) {
    if (frame.type === "gpus") {
      if (frame.full) { gpus = {}; nodes = {}; }
      (frame.nodes || []).forEach(function (n) { nodes[n.id] = n; updateNodeRow(n); });
      var seen = {};
      (frame.gpus || []).forEach(function (g) { seen[g.node_id] = true; });
      if (!frame.full) {  // GPUs of these nodes not in the frame were removed
        Object.keys(gpus).forEach(function (id) { if (seen[gpus[id].node_id] && !frame.gpus.some(function (g) { return g.id == id; })) delete gpus[id]; });
      }
      (frame.gpus || []).forEach(function (g) { gpus[g.id] = g; updateGpuRow(g); });
      renderGrid();
    } else if (frame.type === "tasks") {
      frame.tasks.forEach(updateTaskRow);
    } else if (frame.type === "usage") {
      frame.tenants.forEach(updateUsage);
    } else if (frame.type === "alert") {
      showAlert(frame.alert);
    }
    document.documentElement.setAttribute("data-live-frames",
      String(Number(document.documentElement.getAttribute("data-live-frames") || 0) + 1));
  }

  function connect() {
    var scheme = location.protocol === "https:" ? "wss://" : "ws://";
    var ws = new WebSocket(scheme + location.host + "/ws/cluster/");
    ws.onopen = function () { retry = 500; document.documentElement.setAttribute("data-live", "open"); };
    ws.onmessage = function (e) { onFrame(JSON.parse(e.data)); };
    ws.onclose = function () {
      document.documentElement.setAttribute("data-live", "closed");
      setTimeout(connect, retry);
      retry = Math.min(retry * 2, 15000);
    };
  }

  function start() {
    // Only pages with something live (and the admin index, for alert banners) hold a socket.
    if (document.querySelector("[data-gpu],[data-node],[data-task],[data-tenant],#cluster-grid,#live-console")) {
      connect();
    }
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
