// The booking calendar: FullCalendar (vendored under static/portal/vendor) over
// /calendar/events. A drag fills the reservation request form with the window.
function startBookingCalendar() {
  "use strict";
  const el = document.getElementById("calendar");
  if (!el || !window.FullCalendar) return;
  const filter = document.getElementById("server-filter");
  const canRequest = el.dataset.canRequest === "1";
  // The catalogue (jsi18n) is deferred: this runs after it, on DOMContentLoaded.
  const gettext = window.gettext || ((s) => s);
  const pad = (n) => String(n).padStart(2, "0");
  // Django's DateTimeField accepts "YYYY-MM-DD HH:MM"; the calendar runs in UTC.
  const fmt = (d) => `${d.getUTCFullYear()}-${pad(d.getUTCMonth() + 1)}-${pad(d.getUTCDate())} ${pad(d.getUTCHours())}:${pad(d.getUTCMinutes())}`;
  const calendar = new FullCalendar.Calendar(el, {
    initialView: "timeGridWeek",
    timeZone: "UTC",
    firstDay: 1,
    height: "auto",
    headerToolbar: { left: "prev,next today", center: "title", right: "timeGridWeek,dayGridMonth" },
    buttonText: { today: gettext("today"), week: gettext("week"), month: gettext("month") },
    allDayText: gettext("all-day"),
    selectable: canRequest,
    selectMirror: true,
    allDaySlot: true,
    events: (info, success, failure) => {
      const params = new URLSearchParams({ start: info.startStr, end: info.endStr });
      if (filter && filter.value) params.set("server", filter.value);
      fetch(`${el.dataset.eventsUrl}?${params}`, { credentials: "same-origin" })
        .then((r) => (r.ok ? r.json() : Promise.reject(new Error(r.statusText))))
        .then(success, failure);
    },
    select: (info) => {
      const form = document.getElementById("reservation-form");
      if (!form) return;
      form.querySelector("[name=starts_at]").value = fmt(info.start);
      form.querySelector("[name=ends_at]").value = fmt(info.end);
      const name = form.querySelector("[name=name]");
      form.scrollIntoView({ behavior: "smooth" });
      name.focus();
    },
  });
  calendar.render();
  if (filter) filter.addEventListener("change", () => calendar.refetchEvents());
  window.bookingCalendar = calendar;
}
if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", startBookingCalendar);
else startBookingCalendar();
