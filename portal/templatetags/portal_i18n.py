"""``{{ task.pending_reason|reason }}``: a reason in the reader's language (scheduling.reasons)."""

from __future__ import annotations

from django import template

from scheduling.reasons import translate_reason

register = template.Library()


@register.filter
def reason(text: str) -> str:
    return translate_reason(text)
