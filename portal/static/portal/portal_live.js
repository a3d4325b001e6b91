/* Portal pages (dashboard, task list, task detail): one websocket to /ws/tasks/
 * (the user's tenants only; the server filters), updating task cells and quota
 * bars in place. Frames are coalesced server-side. */
(function () {
  "use strict";
  var retry = 500;
  function $all(sel) { return Array.prototype.slice.call(document.querySelectorAll(sel)); }
  function setText(el, v) { var t = v === null || v === undefined ? "" : String(v); if (el.textContent !== t) el.textContent = t; }

  function summary(t) {
    if (t.status === "pending") return t.pending_reason;
    if (t.node) return t.node;
    return t.failure_reason;
  }

  function refreshEvents(taskId) {
    var body = document.getElementById("task-events");
    var detail = document.querySelector('[data-task-detail="' + taskId + '"]');
    if (!body || !detail) return;
    fetch(body.getAttribute("data-events-url"), {credentials: "same-origin", headers: {Accept: "application/json"}})
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (events) {
        if (!events) return;
        body.innerHTML = "";
        events.forEach(function (e) {
          var tr = document.createElement("tr");
          [new Date(e.created_at).toLocaleString(), (e.from_status || "—") + " → " + e.to_status, e.actor, e.reason]
            .forEach(function (text, i) {
              var td = document.createElement("td");
              if (i === 0) td.className = "muted";
              td.textContent = text;
              tr.appendChild(td);
            });
          body.appendChild(tr);
        });
      });
  }

  function onTask(t) {
    var found = false;
    refreshEvents(t.id);
    $all('[data-task="' + t.id + '"]').forEach(function (el) {
      found = true;
      var field = el.getAttribute("data-field");
      if (field === "status") {
        el.className = "badge s-" + t.status;
        setText(el, t.status_label);
      } else if (field === "summary") {
        setText(el, summary(t));
      } else if (field in t) {
        setText(el, t[field]);
      }
    });
    // A task of the user's tenants that this list does not show yet (a new submission).
    if (!found && document.querySelector("[data-live-tasks]")) showNewTasksHint();
  }

  function showNewTasksHint() {
    if (document.getElementById("live-new-tasks")) return;
    var p = document.createElement("p");
    p.id = "live-new-tasks";
    p.className = "messages";
    var a = document.createElement("a");
    a.href = "";
    a.textContent = (window.gettext || function (s) { return s; })("New or changed tasks: reload to see them");
    p.appendChild(a);
    var table = document.querySelector("[data-live-tasks]");
    table.parentNode.insertBefore(p, table);
  }

  function onUsage(u) {
    Object.keys(u.used).forEach(function (key) {
      $all('[data-tenant-slug="' + u.slug + '"][data-usage="' + key + '"]').forEach(function (el) {
        setText(el, (el.getAttribute("data-prefix") || "") + u.used[key] + (el.getAttribute("data-suffix") || ""));
      });
      $all('[data-tenant-slug="' + u.slug + '"][data-usage-bar="' + key + '"]').forEach(function (el) {
        var limit = Number(el.getAttribute("data-limit"));
        var pct = limit ? Math.min(100, Math.round(100 * u.used[key] / limit)) : (u.used[key] ? 100 : 0);
        el.firstElementChild.style.width = pct + "%";
        el.classList.toggle("full", pct >= 100);
      });
    });
  }

  function onFrame(frame) {
    if (frame.type === "tasks") frame.tasks.forEach(onTask);
    else if (frame.type === "usage") frame.tenants.forEach(onUsage);
    document.documentElement.setAttribute("data-live-frames",
      String(Number(document.documentElement.getAttribute("data-live-frames") || 0) + 1));
  }

  function connect() {
    var scheme = location.protocol === "https:" ? "wss://" : "ws://";
    var ws = new WebSocket(scheme + location.host + "/ws/tasks/");
    ws.onopen = function () { retry = 500; document.documentElement.setAttribute("data-live", "open"); };
    ws.onmessage = function (e) { onFrame(JSON.parse(e.data)); };
    ws.onclose = function (e) {
      document.documentElement.setAttribute("data-live", "closed");
      setTimeout(connect, retry);  // refused (no tenant) closes too: back off to 15 s
      retry = Math.min(retry * 2, 15000);
    };
  }
  if (!document.querySelector("[data-task],[data-tenant-slug]")) return;  // nothing live on this page
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", connect);
  else connect();
})();
