"""Scheduler options: the seeds' defaults, optionally overridden by a YAML file.

``PORTAL_CONFIG=path/to/portal.yaml`` names the file; ``configs/portal.yaml`` is a
commented example. Every key is checked: an unknown key or a bad value raises
``ConfigError`` with one line that names the key, so ``manage.py`` can print it
and exit non-zero instead of running with a half-understood configuration.

The options themselves (``SchedulerConfig``) and the checking of each key live beside the
placement core, in ``scheduling.placement.config``; this module reads the file, checks its
top level and raises the project's ``ConfigError`` (an ``ImproperlyConfigured``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.core.exceptions import ImproperlyConfigured

from scheduling.placement.config import ConfigError as PlacementConfigError
from scheduling.placement.config import SchedulerConfig, parse_config


class ConfigError(ImproperlyConfigured):
    pass


def build_config(data: dict[str, Any] | None) -> SchedulerConfig:
    """Validate a parsed YAML document and return the scheduler options."""
    if data is None:
        return SchedulerConfig()
    if not isinstance(data, dict):
        raise ConfigError("the config file must be a mapping with a 'scheduler' section")
    unknown = sorted(set(data) - {"scheduler"})
    if unknown:
        raise ConfigError(f"unknown top-level key {unknown[0]!r} (expected: scheduler)")
    section = data.get("scheduler") or {}
    if not isinstance(section, dict):
        raise ConfigError("'scheduler' must be a mapping of options")
    try:
        return parse_config(section)
    except PlacementConfigError as exc:
        raise ConfigError(str(exc)) from None


def load_config(path: str | None) -> SchedulerConfig:
    """Read ``path`` (or return the defaults when it is empty)."""
    if not path:
        return SchedulerConfig()
    import yaml

    file = Path(path)
    try:
        text = file.read_text()
    except OSError as exc:
        raise ConfigError(f"PORTAL_CONFIG={path}: cannot read the file ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"PORTAL_CONFIG={path}: not valid YAML{where}") from None
    try:
        return build_config(data)
    except ConfigError as exc:
        raise ConfigError(f"PORTAL_CONFIG={path}: {exc}") from None


__all__ = ["ConfigError", "SchedulerConfig", "build_config", "load_config"]
