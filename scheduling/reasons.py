"""Pending and failure reasons as users read them, in their language.

The placement core writes reasons in English from a small set of templates (it stays
free of Django, translations included). Here each template is a pattern whose
captured values are put back into the translated template at display time. A reason
is a "; "-separated list of parts (and may carry a "requeued: " or "can never fit ...: "
prefix); each part is translated on its own, and a part no pattern knows is shown as
it is rather than hidden.
"""

from __future__ import annotations

import re

from django.utils.translation import get_language, gettext, gettext_noop

from scheduling.choices import TaskStatus

_N = r"(?P<n>\d+)"
# (pattern, msgid): the msgid's %(name)s placeholders are the pattern's groups.
PATTERNS: list[tuple[re.Pattern[str], str]] = [(re.compile(p), m) for p, m in [
    (r"tenant (?P<slug>\S+) at its running-task quota \((?P<used>\d+)/(?P<limit>\d+)\)",
     gettext_noop("tenant %(slug)s at its running-task quota (%(used)s/%(limit)s)")),
    (r"tenant (?P<slug>\S+) at its GPU quota \((?P<used>\d+)/(?P<limit>\d+)\)",
     gettext_noop("tenant %(slug)s at its GPU quota (%(used)s/%(limit)s)")),
    (r"tenant (?P<slug>\S+) near its GPU quota \((?P<used>\d+)/(?P<limit>\d+)\)",
     gettext_noop("tenant %(slug)s near its GPU quota (%(used)s/%(limit)s)")),
    (r"tenant (?P<slug>\S+) at its GPU memory quota \((?P<used>[^/]+)/(?P<limit>[^)]+)\)",
     gettext_noop("tenant %(slug)s at its GPU memory quota (%(used)s/%(limit)s)")),
    (r"tenant (?P<slug>\S+) near its GPU memory quota \((?P<used>[^/]+)/(?P<limit>[^)]+)\)",
     gettext_noop("tenant %(slug)s near its GPU memory quota (%(used)s/%(limit)s)")),
    (r"this task needs (?P<more>.+) more", gettext_noop("this task needs %(more)s more")),
    (rf"waiting behind {_N} higher-priority tasks?", gettext_noop("waiting behind %(n)s higher-priority task(s)")),
    (rf"waiting behind {_N} earlier tasks? in the queue \((?P<higher>\d+) of higher priority\)",
     gettext_noop("waiting behind %(n)s earlier task(s) in the queue (%(higher)s of higher priority)")),
    (r"reserved for backfill: would delay task #(?P<id>\d+)",
     gettext_noop("reserved for backfill: would delay task #%(id)s")),
    (r"(?P<cls>online|batch) share of the cluster full \((?P<pct>[\d.]+%)\): (?P<used>\d+)/(?P<cap>\d+) GPUs in use",
     gettext_noop("%(cls)s share of the cluster full (%(pct)s): %(used)s/%(cap)s GPUs in use")),
    (r"no active server has labels (?P<labels>.+)", gettext_noop("no active server has labels %(labels)s")),
    (r"no active server has schedulable GPUs", gettext_noop("no active server has schedulable GPUs")),
    (rf"no active server has {_N} GPUs?(?P<rest>.*)", gettext_noop("no active server has %(n)s GPU(s)%(rest)s")),
    (rf"no server has {_N} free GPUs? with (?P<mem>.+)", gettext_noop("no server has %(n)s free GPU(s) with %(mem)s")),
    (rf"no server has {_N} empty GPUs?(?P<rest>.*)", gettext_noop("no server has %(n)s empty GPU(s)%(rest)s")),
    (rf"no server has {_N} GPUs? with (?P<mem>.+) free to share",
     gettext_noop("no server has %(n)s GPU(s) with %(mem)s free to share")),
    (r"no server had (?P<what>.+) at its turn", gettext_noop("no server had %(what)s at its turn")),
    (r"capacity freed later went to other tasks", gettext_noop("capacity freed later went to other tasks")),
    (rf"(?:the )?largest has {_N}", gettext_noop("the largest has %(n)s")),
    (rf"(?:the )?best has {_N}", gettext_noop("the best has %(n)s")),
    (r"next in line: GPUs reserved on (?P<server>\S+), free by (?P<when>.+) UTC at the latest",
     gettext_noop("next in line: GPUs reserved on %(server)s, free by %(when)s UTC at the latest")),
    (r"CUDA out of memory(?P<rest>.*)", gettext_noop("CUDA out of memory%(rest)s")),
    (r"retrying with (?P<mb>\d+) MB per GPU", gettext_noop("retrying with %(mb)s MB per GPU")),
    (r"server (?P<server>\S+) lost", gettext_noop("server %(server)s lost")),
    (r"exit code (?P<code>-?\d+)(?P<rest>.*)", gettext_noop("exit code %(code)s%(rest)s")),
    # Reservations (issue 12).
    (r"waiting for GPUs of reservation (?P<name>\S+) \(in use\)",
     gettext_noop("waiting for GPUs of reservation %(name)s (in use)")),
    (r"reservation #(?P<id>\d+) is not active \(over, released or not approved\)",
     gettext_noop("reservation #%(id)s is not active (over, released or not approved)")),
    (r"reservation (?P<name>\S+) belongs to another tenant",
     gettext_noop("reservation %(name)s belongs to another tenant")),
    (r"waiting for reservation (?P<name>\S+), starts in (?P<duration>.+)",
     gettext_noop("waiting for reservation %(name)s, starts in %(duration)s")),
    (r"free GPUs are booked by reservation (?P<name>\S+) until (?P<when>.+)",
     gettext_noop("free GPUs are booked by reservation %(name)s until %(when)s")),
    (r"free GPUs are booked by reservation (?P<name>\S+) from (?P<when>.+)",
     gettext_noop("free GPUs are booked by reservation %(name)s from %(when)s")),
    (r"this task's timeout would run past that", gettext_noop("this task's timeout would run past that")),
    (r"free GPUs are booked by reservations", gettext_noop("free GPUs are booked by reservations")),
    (r"held for task #(?P<id>\d+) of the same tenant: it waits for quota, and this task would still hold it at "
     r"(?P<when>\S+) UTC",
     gettext_noop("held for task #%(id)s of the same tenant: it waits for quota, and this task would still hold it "
                  "at %(when)s UTC")),
    (r"fair share: tasks of tenants with a higher factor went first \(tenant (?P<slug>\S+): (?P<factor>[\d.]+)\)",
     gettext_noop("fair share: tasks of tenants with a higher factor went first (tenant %(slug)s: %(factor)s)")),
    (r"asks for (?P<n>\d+) GPUs with (?P<mem>\d+) MB each: nothing to place",
     gettext_noop("asks for %(n)s GPUs with %(mem)s MB each: nothing to place")),
    # Gangs (issue 13): "no 2 servers with 8 free GPUs (labels zone=a) sharing rack" and its kin.
    (r"asks for (?P<n>\d+) GPUs over (?P<nn>\d+) servers: not the same whole number on each",
     gettext_noop("asks for %(n)s GPUs over %(nn)s servers: not the same whole number on each")),
    (rf"the most there are is {_N}", gettext_noop("the most there are is %(n)s")),
    # Dependencies and arrays (issue 13).
    (r"waiting for task #(?P<id>\d+) to succeed", gettext_noop("waiting for task #%(id)s to succeed")),
    (r"waiting for task #(?P<id>\d+) to end", gettext_noop("waiting for task #%(id)s to end")),
    (r"waiting for task #(?P<id>\d+) to fail", gettext_noop("waiting for task #%(id)s to fail")),
    (r"array #(?P<id>\d+) runs at most (?P<n>\d+) elements at once \(%(?P=n)\)",
     gettext_noop("array #%(id)s runs at most %(n)s elements at once (%%%(n)s)")),
    (r"array #(?P<id>\d+) cancelled", gettext_noop("array #%(id)s cancelled")),
    (r"all (?P<n>\d+) ranks started", gettext_noop("all %(n)s ranks started")),
    (r"every rank was stopped", gettext_noop("every rank was stopped")),
]]
# A gang's capacity (scheduling.placement.reasons.gang_capacity), put together from translated pieces.
_GANG = re.compile(r"no (?P<nn>\d+) servers with (?P<n>\d+) (?:(?P<kind>free|empty) )?GPUs?(?: with (?P<mem>[^()]+?))?"
                   r"(?P<labels> \(.+\))?(?: sharing (?P<topo>\S+))?(?P<when> even when idle| at its turn)?")
_GANG_WHAT = {None: gettext_noop("%(nn)s servers with %(n)s GPU(s) each"),
              "free": gettext_noop("%(nn)s servers with %(n)s free GPU(s) each"),
              "empty": gettext_noop("%(nn)s servers with %(n)s empty GPU(s) each")}
_GANG_NO = {None: gettext_noop("no %(what)s"), " even when idle": gettext_noop("no %(what)s even when idle"),
            " at its turn": gettext_noop("no %(what)s at its turn")}
_BEST = re.compile(rf"(?:the )?best has {_N}")
# "dependency can never be satisfied: task #4 ended failed, it was to succeed"
_NEVER = re.compile(r"dependency can never be satisfied: task #(?P<id>\d+) ended (?P<status>[a-z ]+), "
                    r"it was to (?P<goal>succeed|end|fail)")
_NEVER_GOAL = {"succeed": gettext_noop("dependency can never be satisfied: task #%(id)s ended %(status)s, it was to "
                                       "succeed"),
               "end": gettext_noop("dependency can never be satisfied: task #%(id)s ended %(status)s, it was to end"),
               "fail": gettext_noop("dependency can never be satisfied: task #%(id)s ended %(status)s, it was to "
                                    "fail")}
# "rank 1 on gpu-02 failed: exit code 3", "rank 1 on gpu-02 killed by signal 9", "rank 0 on gpu-01 lost"
_RANK = re.compile(r"rank (?P<rank>\d+) on (?P<server>\S+) (?:(?P<lost>lost)|killed by signal (?P<signal>\d+)|"
                   r"failed: (?P<why>.+))")
PREFIXES = [
    ("requeued: ", gettext_noop("requeued: %(reason)s")),
    ("can never fit on the active servers: ", gettext_noop("can never fit on the active servers: %(reason)s")),
]


def _part(text: str) -> str:
    for pattern, msgid in PATTERNS:
        m = pattern.fullmatch(text)
        if m:
            return gettext(msgid) % m.groupdict()
    m = _GANG.fullmatch(text)
    if m:
        what = gettext(_GANG_WHAT[m["kind"]]) % {"nn": m["nn"], "n": m["n"]}
        if m["mem"]:
            what += gettext(" with %(mem)s") % {"mem": m["mem"]}
        what += m["labels"] or ""
        if m["topo"]:
            what += gettext(" sharing %(label)s") % {"label": m["topo"]}
        return gettext(_GANG_NO[m["when"]]) % {"what": what}
    m = _NEVER.fullmatch(text)
    if m:
        status = m["status"].replace(" ", "_")
        label = TaskStatus(status).label if status in TaskStatus.values else m["status"]
        return gettext(_NEVER_GOAL[m["goal"]]) % {"id": m["id"], "status": label}
    m = _RANK.fullmatch(text)
    if m:
        values = {"rank": m["rank"], "server": m["server"]}
        if m["lost"]:
            return gettext("rank %(rank)s on %(server)s lost") % values
        if m["signal"]:
            return gettext("rank %(rank)s on %(server)s killed by signal %(signal)s") % {
                **values, "signal": m["signal"]}
        return gettext("rank %(rank)s on %(server)s failed: %(why)s") % {**values, "why": _part(m["why"])}
    return text


def translate_reason(reason: str) -> str:
    """``reason`` (English, from the core or the lifecycle) in the active language."""
    if not reason or (get_language() or "en").startswith("en"):
        return reason  # the core's own words; the templates only generalise plurals
    for prefix, msgid in PREFIXES:
        if reason.startswith(prefix):
            return gettext(msgid) % {"reason": translate_reason(reason[len(prefix):])}
    parts = reason.split("; ")
    out = []
    for i, part in enumerate(parts):
        best = _BEST.fullmatch(part)
        if best and i and _GANG.fullmatch(parts[i - 1]):
            # After a gang's "no 2 servers with ...", the best counts servers, not GPUs.
            out.append(gettext("at most %(n)s such servers") % {"n": best["n"]})
        else:
            out.append(_part(part))
    return gettext("; ").join(out)
