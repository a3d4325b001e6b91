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
]]
PREFIXES = [
    ("requeued: ", gettext_noop("requeued: %(reason)s")),
    ("can never fit on the active servers: ", gettext_noop("can never fit on the active servers: %(reason)s")),
]


def _part(text: str) -> str:
    for pattern, msgid in PATTERNS:
        m = pattern.fullmatch(text)
        if m:
            return gettext(msgid) % m.groupdict()
    return text


def translate_reason(reason: str) -> str:
    """``reason`` (English, from the core or the lifecycle) in the active language."""
    if not reason or (get_language() or "en").startswith("en"):
        return reason  # the core's own words; the templates only generalise plurals
    for prefix, msgid in PREFIXES:
        if reason.startswith(prefix):
            return gettext(msgid) % {"reason": translate_reason(reason[len(prefix):])}
    return gettext("; ").join(_part(p) for p in reason.split("; "))
