"""A foreign key over several columns, which Django's ``ForeignKey`` cannot declare.

``CompositeForeignKey(fields=["gpu", "node"], to="nodes.GPU", to_fields=["id", "node"])``
says, in one check, both that the GPU exists and that the row's server is that GPU's server
(and so exists too). The two single-column keys it replaces each cost PostgreSQL a check of
their own on every insert. Like Django's own keys it is ``DEFERRABLE INITIALLY DEFERRED``, and
``MATCH SIMPLE``: a row with any of its columns NULL is not checked.
"""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.db import DEFAULT_DB_ALIAS
from django.db.models import BaseConstraint


class CompositeForeignKey(BaseConstraint):
    def __init__(self, *, fields: list[str] | tuple[str, ...], to: str, to_fields: list[str] | tuple[str, ...],
                 name: str, violation_error_code: str | None = None,
                 violation_error_message: str | None = None) -> None:
        if len(fields) < 2 or len(fields) != len(to_fields):
            raise ValueError("CompositeForeignKey needs two or more fields, as many as to_fields")
        self.fields = tuple(fields)
        self.to = to
        self.to_fields = tuple(to_fields)
        super().__init__(name=name, violation_error_code=violation_error_code,
                         violation_error_message=violation_error_message)

    def _columns(self, model) -> list[str]:
        return [model._meta.get_field(f).column for f in self.fields]

    def _target(self, model):
        # Through the model's own registry: in a migration, the historical models.
        return model._meta.apps.get_model(self.to)

    def _references_sql(self, model, schema_editor) -> str:
        quote = schema_editor.quote_name
        target = self._target(model)
        return "FOREIGN KEY ({}) REFERENCES {} ({}){}".format(
            ", ".join(quote(c) for c in self._columns(model)),
            quote(target._meta.db_table),
            ", ".join(quote(target._meta.get_field(f).column) for f in self.to_fields),
            schema_editor.connection.ops.deferrable_sql(),
        )

    def constraint_sql(self, model, schema_editor) -> str:
        return f"CONSTRAINT {schema_editor.quote_name(self.name)} {self._references_sql(model, schema_editor)}"

    def create_sql(self, model, schema_editor) -> str:
        table = schema_editor.quote_name(model._meta.db_table)
        return f"ALTER TABLE {table} ADD {self.constraint_sql(model, schema_editor)}"

    def remove_sql(self, model, schema_editor):
        return schema_editor._delete_constraint_sql(schema_editor.sql_delete_fk, model,
                                                    schema_editor.quote_name(self.name))

    def validate(self, model, instance, exclude=None, using=DEFAULT_DB_ALIAS) -> None:
        if exclude and any(f in exclude for f in self.fields):
            return
        values = [getattr(instance, model._meta.get_field(f).attname) for f in self.fields]
        if any(v is None for v in values):
            return
        target = self._target(model)
        lookup = {target._meta.get_field(f).attname: v for f, v in zip(self.to_fields, values, strict=True)}
        if not target._default_manager.using(using).filter(**lookup).exists():
            raise ValidationError(self.get_violation_error_message(), code=self.violation_error_code)

    def deconstruct(self):
        path, args, kwargs = super().deconstruct()
        kwargs.update(fields=list(self.fields), to=self.to, to_fields=list(self.to_fields))
        return path, args, kwargs

    def __eq__(self, other) -> bool:
        if isinstance(other, CompositeForeignKey):
            return self.deconstruct() == other.deconstruct()
        return super().__eq__(other)

    def __repr__(self) -> str:
        return (f"<{self.__class__.__name__}: fields={self.fields!r} to={self.to!r} to_fields={self.to_fields!r} "
                f"name={self.name!r}>")
