// Draws the stacked GPU-hours chart of the usage pages from their json_script data
// ({labels, datasets: [{label, data}], title}); Chart.js is vendored, never a CDN.
(function () {
  function draw() {
    var canvas = document.getElementById("usage-chart");
    var source = document.getElementById("usage-chart-data");
    if (!canvas || !source || typeof Chart === "undefined") return;
    var data = JSON.parse(source.textContent);
    data.datasets.forEach(function (d, i) { d.backgroundColor = "hsl(" + ((i * 137) % 360) + ",60%,55%)"; });
    new Chart(canvas, {
      type: "bar",
      data: {labels: data.labels, datasets: data.datasets},
      options: {
        animation: false,
        plugins: {title: {display: true, text: data.title}},
        scales: {x: {stacked: true}, y: {stacked: true, title: {display: true, text: "GPU-hours"}}}
      }
    });
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", draw); else draw();
})();
