"""``{{ task.pending_reason|reason }}``: a reason in the reader's language (scheduling.reasons);
``{{ status|window_state }}``: a reservation's or quota grant's state word in it."""

from __future__ import annotations

from django import template
from django.utils.translation import pgettext_lazy

from scheduling.reasons import translate_reason

register = template.Library()

# Where a reservation or grant stands (scheduling.reservations.as_row, portal.views.quota_grants),
# in a context of their own ("active" here is not a server's "active"); lazy: read at display time.
WINDOW_STATES = {
    "requested": pgettext_lazy("window", "requested"), "approved": pgettext_lazy("window", "approved"),
    "rejected": pgettext_lazy("window", "rejected"), "released": pgettext_lazy("window", "released"),
    "active": pgettext_lazy("window", "active"), "upcoming": pgettext_lazy("window", "upcoming"),
    "over": pgettext_lazy("window", "over"), "expired": pgettext_lazy("window", "expired"),
}


@register.filter
def reason(text: str) -> str:
    return translate_reason(text)


@register.filter
def window_state(value: str) -> str:
    return str(WINDOW_STATES.get(value, value))
