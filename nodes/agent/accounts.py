"""Which Unix account a task runs as, and the clean environment it gets.

An agent started as root never runs a task as itself. For each task it picks, in
order (each step can be switched off per server, see ``AccountPolicy``):

1. the submitting portal user's name, where an account of that name exists here;
2. a per-tenant account (``--tenant-account``, default ``gpu-{tenant}``) where it exists;
3. the fallback account (``--fallback-account``, default ``nobody``).

Accounts found by name in steps 1 and 2 must have a uid of at least
``--min-task-uid`` (default 1000), so a portal user called ``root``, ``postgres``
or ``www-data`` never maps onto a system account. uid 0 is never used.

An agent that is not root cannot switch accounts. It then runs tasks as its own
account only when the operator says the host serves one user
(``--single-user-host``); otherwise it refuses to start.
"""

from __future__ import annotations

import ctypes
import os
import pwd
from dataclasses import dataclass

# What a task sees besides its own env and the portal's variables: enough for a login-less
# shell, nothing of the agent's (its variables may hold the join token or proxy credentials).
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


class AccountError(Exception):
    """No account may run this task (one readable line)."""


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str


@dataclass(frozen=True)
class AccountPolicy:
    map_users: bool = True
    tenant_format: str = "gpu-{tenant}"  # "" turns per-tenant accounts off
    fallback: str = "nobody"  # "" refuses tasks that match no account
    min_uid: int = 1000
    single_user_host: bool = False

    @property
    def switches_accounts(self) -> bool:
        return not self.single_user_host

    def check_agent(self, euid: int) -> str | None:
        """Why this agent must not start tasks under this policy, or None."""
        if euid == 0 and self.single_user_host:
            return ("--single-user-host is for an agent that runs as the host's one user, not as root: "
                    "as root, tasks run as mapped accounts")
        if euid != 0 and not self.single_user_host:
            return (f"the agent runs as uid {euid}, not root, so it cannot start tasks under their own accounts; "
                    "run it as root, or pass --single-user-host if this host serves only this account")
        return None

    def resolve(self, user: str, tenant: str) -> Account:
        if self.single_user_host:
            return _account(pwd.getpwuid(os.geteuid()))
        candidates = []
        if self.map_users and user:
            candidates.append(("portal user", user))
        if self.tenant_format and tenant:
            candidates.append(("tenant", self.tenant_format.format(tenant=tenant)))
        for _, name in candidates:
            entry = _lookup(name)
            if entry is not None and entry.pw_uid >= self.min_uid:
                return _account(entry)
        if self.fallback:
            entry = _lookup(self.fallback)
            if entry is not None and entry.pw_uid != 0:
                return _account(entry)
        tried = ", ".join(f"{what} {name!r}" for what, name in candidates) or "none"
        raise AccountError(f"no account to run the task as on this server (tried {tried}; "
                           f"fallback {self.fallback or 'off'!s})")


def _lookup(name: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(name)
    except (KeyError, ValueError):  # unknown, or a name no account can have (NUL)
        return None


def _account(entry: pwd.struct_passwd) -> Account:
    groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
    return Account(name=entry.pw_name, uid=entry.pw_uid, gid=entry.pw_gid, groups=groups, home=entry.pw_dir)


def base_environment(account: Account, work_dir: str) -> dict[str, str]:
    home = account.home if account.home and os.path.isdir(account.home) else work_dir
    return {"PATH": DEFAULT_PATH, "HOME": home, "USER": account.name, "LOGNAME": account.name,
            "LANG": "C.UTF-8"}


PR_SET_NO_NEW_PRIVS = 38  # <linux/prctl.h>
_libc = ctypes.CDLL(None, use_errno=True)


def set_no_new_privs() -> None:
    """Runs in the child between fork and exec (``preexec_fn``), after the switch of
    account: no setuid binary (sudo, su, ping) can raise the task's privileges again.
    Everything it touches is loaded beforehand, so the child imports nothing."""
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
