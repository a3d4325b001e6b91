/* The task page's live log: opens at the newest lines (rendered by the page), then
 * appends what the task writes, over /ws/tasks/<id>/log/ (portal.consumers.TaskLogConsumer).
 * It keeps following while the reader is at the bottom; scrolling up stops the follow
 * until they scroll back down. A requeued task's new attempt replaces the text. A gang
 * keeps one log per rank: the selector (#task-log-rank) switches the text and the socket. */
(function () {
  "use strict";
  var pre = document.getElementById("task-log");
  if (!pre) return;
  var MAX_CHARS = 2000000;  // keep the page light: drop the oldest text past this
  var attempt = Number(pre.getAttribute("data-attempt"));
  var offset = Number(pre.getAttribute("data-offset"));
  var rank = Number(pre.getAttribute("data-rank") || 0);
  var retry = 500;
  var frames = 0;
  var socket = null;

  function atBottom() { return pre.scrollHeight - pre.scrollTop - pre.clientHeight < 24; }
  function toBottom() { pre.scrollTop = pre.scrollHeight; }

  function onLog(f) {
    var follow = atBottom();
    if (f.reset) {
      pre.textContent = f.data;
      attempt = f.attempt;
      var label = document.getElementById("task-log-attempt");
      if (label) label.textContent = String(f.attempt + 1);
      var full = document.getElementById("task-log-full");
      if (full) full.href = full.href.replace(/attempt=\d+/, "attempt=" + f.attempt).replace(/rank=\d+/, "rank=" + rank);
      follow = true;
    } else if (f.data) {
      pre.appendChild(document.createTextNode(f.data));
      if (pre.textContent.length > MAX_CHARS) pre.textContent = pre.textContent.slice(-MAX_CHARS / 2);
    }
    offset = f.offset + new TextEncoder().encode(f.data).length;
    if (follow) toBottom();
    frames += 1;
    pre.setAttribute("data-log-frames", String(frames));
  }

  function connect() {
    var scheme = location.protocol === "https:" ? "wss://" : "ws://";
    // Continue from what is on the page (or was received), so nothing shows twice or goes missing.
    // (No attempt/offset after a rank switch: the server starts with that rank's newest lines.)
    var query = "?rank=" + rank + (attempt === null ? "" : "&attempt=" + attempt + "&offset=" + offset);
    var ws = socket = new WebSocket(scheme + location.host + pre.getAttribute("data-log-ws") + query);
    ws.onopen = function () { retry = 500; pre.setAttribute("data-log-live", "open"); };
    ws.onmessage = function (e) { var f = JSON.parse(e.data); if (f.type === "log") onLog(f); };
    ws.onclose = function () {
      pre.setAttribute("data-log-live", "closed");
      setTimeout(connect, retry);
      retry = Math.min(retry * 2, 15000);
    };
  }

  var select = document.getElementById("task-log-rank");
  if (select) {
    select.addEventListener("change", function () {
      rank = Number(select.value);
      attempt = null;
      offset = 0;
      pre.textContent = "";
      pre.setAttribute("data-rank", String(rank));
      var url = new URL(location.href);
      url.searchParams.set("rank", String(rank));
      history.replaceState(null, "", url);
      if (socket) { socket.onclose = null; socket.onmessage = null; socket.close(); }
      retry = 500;
      connect();
    });
  }

  toBottom();  // open at the newest lines
  connect();
})();
