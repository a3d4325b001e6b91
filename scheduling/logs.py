"""Reading a task's output back from ``TaskLogChunk`` rows: from a byte offset
(to follow a log) or the last N lines (to glance at it). Shared by the API
and the portal."""

from __future__ import annotations

from dataclasses import dataclass

from scheduling.models import Task, TaskLogChunk

PAGE_MAX_BYTES = 1024 * 1024
TAIL_MAX_LINES = 10_000
VIEW_TAIL_LINES = 200  # what the task page (and its live log) opens with


@dataclass(frozen=True)
class LogPage:
    task: int
    attempt: int
    offset: int
    next_offset: int
    data: str
    final: bool


def _end(chunk: TaskLogChunk) -> int:
    return chunk.offset + len(chunk.data.encode())


def read_from(task: Task, offset: int = 0, attempt: int | None = None, max_bytes: int = PAGE_MAX_BYTES,
              rank: int = 0) -> LogPage:
    """Output from byte ``offset`` on (up to ``max_bytes``); follow with ``next_offset``.
    A gang keeps one log per rank (server); ``rank`` picks it."""
    attempt = task.attempt if attempt is None else attempt
    chunks = TaskLogChunk.objects.filter(task=task, attempt=attempt, rank=rank)
    parts: list[bytes] = []
    size = 0
    start = offset
    # A chunk that began before the offset but runs past it contributes its tail.
    before = chunks.filter(offset__lt=offset).order_by("-offset").first()
    if before is not None and _end(before) > offset:
        part = before.data.encode()[offset - before.offset:]
        parts.append(part)
        size += len(part)
    next_offset = offset + size
    for chunk in chunks.filter(offset__gte=offset).order_by("offset").iterator(chunk_size=200):
        if parts and size >= max_bytes:
            break
        part = chunk.data.encode()
        if not parts:
            start = chunk.offset
        parts.append(part)
        size += len(part)
        next_offset = _end(chunk)
    return LogPage(task.pk, attempt, start, max(next_offset, offset),
                   b"".join(parts).decode(errors="replace"), task.is_final)


def tail(task: Task, lines: int = 100, attempt: int | None = None, rank: int = 0) -> LogPage:
    """The last ``lines`` lines (at most ``PAGE_MAX_BYTES``)."""
    attempt = task.attempt if attempt is None else attempt
    parts: list[TaskLogChunk] = []
    size = newlines = 0
    chunks = TaskLogChunk.objects.filter(task=task, attempt=attempt, rank=rank)
    for chunk in chunks.order_by("-offset").iterator(chunk_size=50):
        parts.append(chunk)
        size += len(chunk.data)
        newlines += chunk.data.count("\n")
        if newlines > lines or size >= PAGE_MAX_BYTES:
            break
    if not parts:
        return LogPage(task.pk, attempt, 0, 0, "", task.is_final)
    parts.reverse()
    text = "".join(c.data for c in parts)
    kept = text.splitlines(keepends=True)[-lines:] if lines > 0 else []
    data = "".join(kept)
    next_offset = _end(parts[-1])
    return LogPage(task.pk, attempt, next_offset - len(data.encode()), next_offset, data, task.is_final)
