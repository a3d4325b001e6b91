/* History charts (portal.history_views -> Chart.js from static/vendor/chartjs, no CDN).
 * Every element with data-history="<json url>" gets a line chart; its range buttons
 * (data-range) fetch the same URL with ?range=. Loaded once per chart partial: the
 * data-history-ready mark keeps a second copy from drawing a chart twice. */
(function () {
  "use strict";
  if (window.portalHistoryCharts) return;
  window.portalHistoryCharts = true;

  var COLOURS = ["#2453c7", "#d92d20", "#079455", "#dc6803", "#7a5af8", "#0e9384", "#c11574", "#475467"];

  function label(ms, step) {
    var d = new Date(ms);
    if (step >= 86400) return d.toLocaleDateString();
    return step >= 3600 ? d.toLocaleString([], {month: "short", day: "numeric", hour: "2-digit"})
                        : d.toLocaleTimeString([], {hour: "2-digit", minute: "2-digit"});
  }

  function draw(el, answer) {
    var canvas = el.querySelector("canvas");
    var existing = window.Chart.getChart(canvas);
    if (existing) existing.destroy();
    var units = {y: [], y2: []};
    var points = 0;
    var datasets = answer.series.map(function (s, i) {
      units[s.axis].indexOf(s.unit) < 0 && units[s.axis].push(s.unit);
      points += s.points.length;
      return {
        label: s.label + " (" + s.unit + ")", yAxisID: s.axis, stepped: !!s.stepped,
        borderDash: s.dashed ? [6, 4] : [], borderColor: COLOURS[i % COLOURS.length],
        backgroundColor: COLOURS[i % COLOURS.length], borderWidth: 1.5, pointRadius: s.points.length < 3 ? 3 : 0,
        data: s.points.map(function (p) { return {x: p[0], y: p[1]}; })
      };
    });
    var scales = {x: {type: "linear", ticks: {maxTicksLimit: 8, callback: function (v) { return label(v, answer.step_s); }}}};
    scales.y = {position: "left", beginAtZero: true, title: {display: true, text: units.y.join(", ")}};
    if (units.y2.length) scales.y2 = {position: "right", beginAtZero: true, grid: {drawOnChartArea: false},
                                      title: {display: true, text: units.y2.join(", ")}};
    new window.Chart(canvas, {
      type: "line", data: {datasets: datasets},
      options: {animation: false, maintainAspectRatio: false, parsing: true, interaction: {mode: "nearest", intersect: false},
                scales: scales, plugins: {legend: {labels: {boxWidth: 12}},
                tooltip: {callbacks: {title: function (items) { return items.length ? new Date(items[0].parsed.x).toLocaleString() : ""; }}}}}
    });
    el.querySelector(".history-empty").hidden = points > 0;
    el.setAttribute("data-history-points", String(points));
    el.setAttribute("data-history-range", answer.range);
  }

  function load(el, range) {
    var url = el.getAttribute("data-history") + (range ? "?range=" + encodeURIComponent(range) : "");
    return fetch(url, {credentials: "same-origin", headers: {Accept: "application/json"}})
      .then(function (r) { if (!r.ok) throw new Error("HTTP " + r.status); return r.json(); })
      .then(function (answer) { draw(el, answer); })
      .catch(function (e) { el.setAttribute("data-history-error", String(e)); });
  }

  function init(el) {
    if (el.hasAttribute("data-history-ready")) return;
    el.setAttribute("data-history-ready", "");
    Array.prototype.forEach.call(el.querySelectorAll("[data-range]"), function (b) {
      b.addEventListener("click", function () {
        Array.prototype.forEach.call(el.querySelectorAll("[data-range]"), function (o) { o.classList.toggle("on", o === b); });
        load(el, b.getAttribute("data-range"));
      });
    });
    var on = el.querySelector("[data-range].on");
    load(el, on ? on.getAttribute("data-range") : null);
  }

  function start() { Array.prototype.forEach.call(document.querySelectorAll("[data-history]"), init); }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
