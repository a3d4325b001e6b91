"""The task listing's filters, one ``FilterSet`` shared by ``GET /api/v1/tasks`` and the
portal's task page, so a query means the same in both.

Query parameters (README, "REST API"): ``status`` (comma-separated states, or a group of
``choices.STATUS_GROUPS``: ``open`` = not ended, ``active`` = holding GPUs), ``tenant``
(comma-separated slugs), ``priority`` (comma-separated names, any case), ``array`` (an
array's id), ``mine`` (true/false: only tasks I submitted) and ``ordering``
(``-created_at``, the default, or ``queue``). A bad value is a form error, which the API
answers with a 400 naming the field and the portal shows above an empty list; unknown
parameters (``limit``, ``offset``, ``page``) are left to the pagination.
"""

from __future__ import annotations

import re
from typing import Any

import django_filters
from django import forms
from django.core.exceptions import ValidationError
from django.db.models import Case, IntegerField, QuerySet, Value, When
from django.utils.translation import gettext_lazy as _
from drf_spectacular.drainage import set_override

from scheduling.choices import STATUS_GROUPS, TaskStatus
from scheduling.models import Task
from tenants.choices import Priority

# The groups ?status= takes beside single states: open (not ended), active (holding GPUs).
_GROUPS_TEXT = "; ".join(f"{name}: {', '.join(states)}" for name, states in STATUS_GROUPS.items())
_WHOLE_NUMBER = re.compile(r"[0-9]{1,18}")  # ASCII digits only: int() also takes " 1", "1_0" and "١٢"


def _no_nul(value: str) -> None:
    if "\x00" in value:
        raise ValidationError("Null characters are not allowed.")


class CsvField(forms.CharField):
    """Comma-separated words, each turned into a value by ``parse`` (None: unknown, with
    ``unknown`` as the message: a translatable text with ``%(value)r`` for the word and
    ``params`` for the rest); returns the values, or [] when none was given."""

    def __init__(self, *, parse, unknown: str, params: dict | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.parse, self.unknown, self.params = parse, unknown, params or {}

    def to_python(self, value: Any) -> list:
        text = super().to_python(value)
        out: list = []
        for word in (w.strip() for w in text.split(",")):
            if not word:
                continue
            parsed = self.parse(word)
            if parsed is None:
                raise ValidationError(self.unknown, params={**self.params, "value": word[:80]})
            out.extend(parsed if isinstance(parsed, (list, tuple)) else [parsed])
        return out


class _Typed(django_filters.Filter):
    """A filter of our own form field, described in the schema as ``schema_type`` with its
    help text (drf-spectacular cannot guess either from a custom field)."""

    schema_type = "string"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        set_override(self, "field", {"type": self.schema_type, "description": kwargs.get("help_text", "")})


class CsvFilter(_Typed):
    """``field_name__in`` the comma-separated values (nothing given: no filter)."""

    field_class = CsvField

    def __init__(self, *, parse, unknown: str, params: dict | None = None, **kwargs: Any) -> None:
        super().__init__(lookup_expr="in", parse=parse, unknown=unknown, params=params, **kwargs)

    def filter(self, qs: QuerySet, value: list) -> QuerySet:
        return super().filter(qs, list(dict.fromkeys(value)) or None)


class StrictBooleanField(forms.CharField):
    """true/false, yes/no, 1/0 (any case; empty: false); anything else is an error, never
    quietly false (``forms.NullBooleanField`` reads "maybe" as no answer)."""

    def to_python(self, value: Any) -> bool:
        text = super().to_python(value).lower()
        if text in ("", "0", "false", "no"):
            return False
        if text in ("1", "true", "yes"):
            return True
        raise ValidationError(_("Must be true or false."))


class WholeNumberField(forms.CharField):
    """ASCII digits (``forms.IntegerField`` also takes " 1", "1.0" and other scripts' digits)."""

    default_error_messages = {"invalid": _("Must be a whole number.")}

    def to_python(self, value: Any) -> int | None:
        text = super().to_python(value)
        if not text:
            return None
        if not _WHOLE_NUMBER.fullmatch(text):
            raise ValidationError(self.error_messages["invalid"], code="invalid")
        return int(text)


class WholeNumberFilter(_Typed):
    field_class = WholeNumberField
    schema_type = "integer"


class StrictBooleanFilter(_Typed):
    field_class = StrictBooleanField
    schema_type = "boolean"


def _status(word: str) -> list[str] | None:
    if word in STATUS_GROUPS:
        return [str(s) for s in STATUS_GROUPS[word]]
    return [word] if word in TaskStatus.values else None


def _priority(word: str) -> int | None:
    try:
        return int(Priority.from_name(word))
    except KeyError:
        return None


def _tenant(word: str) -> str:
    _no_nul(word)
    return word


def _queue_order(qs: QuerySet) -> QuerySet:
    """Running, then assigned, then pending in queue order (the scheduler's view)."""
    rank = Case(When(status=TaskStatus.RUNNING, then=Value(0)), When(status=TaskStatus.ASSIGNED, then=Value(1)),
                When(status=TaskStatus.PENDING, then=Value(2)), default=Value(3), output_field=IntegerField())
    return qs.annotate(rank=rank).order_by("rank", "queue_position", "-priority", "created_at", "id")


ORDERINGS = {"-created_at": lambda qs: qs.order_by("-created_at", "-id"), "queue": _queue_order}


class OrderingFilter(django_filters.ChoiceFilter):
    """One of ``ORDERINGS``; always applied (the first when none is given)."""

    def __init__(self, **kwargs: Any) -> None:
        choices = [(name, name) for name in ORDERINGS]
        super().__init__(choices=choices, error_messages={"invalid_choice": _("Use '-created_at' or 'queue'.")},
                         **kwargs)

    def filter(self, qs: QuerySet, value: str) -> QuerySet:
        return ORDERINGS[value or next(iter(ORDERINGS))](qs)


class TaskFilter(django_filters.FilterSet):
    status = CsvFilter(parse=_status, unknown=_("Unknown state %(value)r: use %(states)s."),
                       params={"states": f"{', '.join(TaskStatus.values)} (or {_GROUPS_TEXT})"},
                       help_text=f"comma-separated states, e.g. pending,running; {_GROUPS_TEXT}")
    tenant = CsvFilter(field_name="tenant__slug", parse=_tenant, unknown=_("Unknown tenant %(value)r."),
                       help_text="comma-separated tenant slugs")
    priority = CsvFilter(parse=_priority, unknown=_("Unknown priority %(value)r: use %(names)s."),
                         params={"names": ", ".join(Priority.labels)},
                         help_text=f"comma-separated: {', '.join(Priority.labels)}")
    array = WholeNumberFilter(field_name="array_id", help_text="an array's id: its elements only",
                              error_messages={"invalid": _("Must be an array id (a whole number).")})
    mine = StrictBooleanFilter(method="filter_mine",
                                 help_text="only tasks I submitted")
    ordering = OrderingFilter(help_text="'-created_at' (default) or 'queue' (running, then pending in queue order)")

    class Meta:
        model = Task
        fields = ["status", "tenant", "priority", "array", "mine", "ordering"]

    def filter_mine(self, qs: QuerySet, name: str, value: bool) -> QuerySet:
        if not value:
            return qs
        return qs.filter(submitter=self.request.user) if self.request is not None else qs.none()

