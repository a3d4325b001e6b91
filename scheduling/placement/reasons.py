"""Reason text: why a task waits, built from the structured cause the checks found.

Every pending task gets one human-readable reason (``PendingInfo.reason``). The checks in
the other modules find *what* blocks a task (the quota and its figures, the share, the
server count, the reservation) and pass those figures here; these functions alone decide
the words. ``scheduling.reasons`` (outside the core) translates them for display from the
same few templates, so a new reason here needs a template there.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from scheduling.placement.fit import EXCLUSIVE, WHOLE

# Task.pending_reason holds 500 characters; a long label selector must not overflow it.
MAX_REASON_CHARS = 500


# ---------------------------------------------------------------- units


def format_mb(mb: int) -> str:
    if mb and mb % 1000 == 0:
        return f"{mb // 1000} GB"
    return f"{mb} MB"


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def duration(delta: timedelta) -> str:
    """"2 h", "45 min", "3 d 4 h": how long until a reservation starts."""
    minutes = max(1, int(delta.total_seconds() // 60))
    if minutes < 60:
        return f"{minutes} min"
    hours = minutes // 60
    if hours < 48:
        return f"{hours} h" + (f" {minutes % 60} min" if minutes % 60 and hours < 3 else "")
    return f"{hours // 24} d" + (f" {hours % 24} h" if hours % 24 else "")


def hhmm(when: datetime) -> str:
    return f"{(when.astimezone(UTC) if when.tzinfo else when):%Y-%m-%d %H:%M}"


def utc(when: datetime) -> str:
    return f"{hhmm(when)} UTC"


def constraint_text(ckey: tuple) -> str:
    """" (labels zone=a; gpu_model 'A100')" for a request's constraints, "" for none."""
    selector, model = ckey
    parts = []
    if selector:
        parts.append("labels " + ", ".join(f"{k}={v}" for k, v in selector))
    if model:
        parts.append(f"gpu_model '{model}'")
    return f" ({'; '.join(parts)})" if parts else ""


# ---------------------------------------------------------------- the request itself


def nothing_to_place(c: int, mem: int | None) -> str:
    return f"asks for {c} GPUs with {mem} MB each: nothing to place"


def gang_uneven(c: int, nn: int) -> str:
    return f"asks for {c} GPUs over {nn} servers: not the same whole number on each"


def no_labels(selector: tuple) -> str:
    return f"no active server has labels {', '.join(f'{k}={v}' for k, v in selector)}"


def no_gpu_model(selector: tuple, model: str) -> str:
    where = "no active server"
    if selector:
        where += " with labels " + ", ".join(f"{k}={v}" for k, v in selector)
    return f"{where} has GPUs matching gpu_model '{model}'"


def no_schedulable_gpus() -> str:
    return "no active server has schedulable GPUs"


def too_few_gpus(c: int, ckey: tuple, largest: int) -> str:
    return f"no active server has {plural(c, 'GPU')}{constraint_text(ckey)}; the largest has {largest}"


def too_little_memory(c: int, mem: int, mode: str, margin: int, ckey: tuple, baseline: int, best: int) -> str:
    with_margin = f" + the {format_mb(margin)} safety margin" if margin else ""
    what = f"{format_mb(mem)}{with_margin}" if mode != WHOLE else f"room after the {format_mb(margin)} margin"
    idle = f" (idle GPUs already use up to {format_mb(baseline)})" if baseline else ""
    return f"no active server has {plural(c, 'GPU')} with {what}{constraint_text(ckey)}{idle}; the best has {best}"


# ---------------------------------------------------------------- tenant quota and class share


def running_quota(slug: str, running: int, limit: int) -> str:
    return f"tenant {slug} at its running-task quota ({running}/{limit})"


def gpu_quota(slug: str, used: int, limit: int, need: int) -> str:
    if used >= limit:
        return f"tenant {slug} at its GPU quota ({used}/{limit})"
    return f"tenant {slug} near its GPU quota ({used}/{limit}); this task needs {need} more"


def memory_quota(slug: str, used_mb: int, limit_mb: int, need_mb: int) -> str:
    if used_mb >= limit_mb:
        return f"tenant {slug} at its GPU memory quota ({format_mb(used_mb)}/{format_mb(limit_mb)})"
    return (f"tenant {slug} near its GPU memory quota ({format_mb(used_mb)}/{format_mb(limit_mb)}); "
            f"this task needs {format_mb(need_mb)} more")


def quota_hold(task_id: int, when: datetime) -> str:
    return (f"held for task #{task_id} of the same tenant: it waits for quota, "
            f"and this task would still hold it at {hhmm(when)} UTC")


def class_share(cls: str, share: float, used: int, cap: int, need: int, lender: str | None) -> str:
    """``lender``: the other class when borrowing is on (it had no idle GPUs to lend)."""
    r = f"{cls} share of the cluster full ({share * 100:.0f}%): {used}/{cap} GPUs in use"
    if used < cap:
        r += f", this task needs {need}"
    if lender is not None:
        r += f", and the {lender} share has no idle GPUs to lend"
    return r


# ---------------------------------------------------------------- queue and backfill


def waiting_behind(waiting_total: int, waiting_higher: int) -> str:
    if waiting_higher == waiting_total:
        return f"waiting behind {plural(waiting_total, 'higher-priority task')}"
    return (f"waiting behind {plural(waiting_total, 'earlier task')} in the queue "
            f"({waiting_higher} of higher priority)")


def reserved_for_backfill(task_id: int) -> str:
    return f"reserved for backfill: would delay task #{task_id}"


def next_in_line(reason: str, servers: list[str], when: datetime) -> str:
    """The head task's capacity reason plus its backfill reservation. Running tasks may end
    sooner than their timeouts; ``when`` is the latest it should wait."""
    return (f"{reason}; next in line: GPUs reserved on {', '.join(servers)}, "
            f"free by {hhmm(when)} UTC at the latest")


def fair_share(reason: str, tenant: str, factor: float) -> str:
    return f"{reason}; fair share: tasks of tenants with a higher factor went first (tenant {tenant}: {factor:.2f})"


# ---------------------------------------------------------------- capacity


def capacity(c: int, mem: int, mode: str, ckey: tuple, best: int) -> str:
    """No server has room for a single-server request now; ``best``: the most GPUs one offers."""
    if mode == EXCLUSIVE:
        what = f"{plural(c, 'free GPU')} with {format_mb(mem)}"
    elif mode == WHOLE:
        what = f"{plural(c, 'empty GPU')}"
    else:
        what = f"{plural(c, 'GPU')} with {format_mb(mem)} free to share"
    suffix = constraint_text(ckey)
    if best >= c:
        # Capacity came back later in the pass (a preemption): say what happened at its turn.
        return f"no server had {what}{suffix} at its turn; capacity freed later went to other tasks"
    return f"no server has {what}{suffix}; best has {best}"


def gang_servers(shape: tuple, free: str) -> str:
    """"2 servers with 8 free GPUs with 70 GB sharing rack" for a gang's shape."""
    _g, nn, k, mem, mode, ckey, topo = shape
    what = plural(k, f"{free} GPU".lstrip()) + (f" with {format_mb(mem)}" if mode != WHOLE else "")
    sharing = f" sharing {topo}" if topo else ""
    return f"{nn} servers with {what}{constraint_text(ckey)}{sharing}"


def gang_never(shape: tuple, best: int) -> str:
    return f"no {gang_servers(shape, '')} even when idle; the most there are is {best}"


def gang_capacity(shape: tuple, best: int) -> str:
    servers = gang_servers(shape, "empty" if shape[4] == WHOLE else "free")
    if best >= shape[1]:
        return f"no {servers} at its turn; capacity freed later went to other tasks"
    return f"no {servers}; best has {best}"


# ---------------------------------------------------------------- booked reservations


def reservation_inactive(reservation_id: int) -> str:
    return f"reservation #{reservation_id} is not active (over, released or not approved)"


def reservation_of_another_tenant(name: str) -> str:
    return f"reservation {name} belongs to another tenant"


def reservation_not_started(name: str, until_start: timedelta) -> str:
    return f"waiting for reservation {name}, starts in {duration(until_start)}"


def reservation_in_use(name: str) -> str:
    return f"waiting for GPUs of reservation {name} (in use)"


def booked_now(name: str, ends_at: datetime) -> str:
    return f"free GPUs are booked by reservation {name} until {utc(ends_at)}"


def booked_from(name: str, starts_at: datetime) -> str:
    return f"free GPUs are booked by reservation {name} from {utc(starts_at)}; this task's timeout would run past that"


def booked() -> str:
    return "free GPUs are booked by reservations"


# ---------------------------------------------------------------- preemption


def preempted_by(priority_name: str, task_id: int) -> str:
    return f"preempted by {priority_name} task #{task_id}"


def reclaimed(lender: str, cls: str, task_id: int) -> str:
    return f"borrowed {lender} GPUs reclaimed for {cls} task #{task_id}"
