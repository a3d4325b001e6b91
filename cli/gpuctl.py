#!/usr/bin/env python3
"""gpuctl: submit and follow GPU tasks on the portal, like sbatch/squeue.

Talks only HTTP to the portal's /api/v1 and needs only the Python standard
library, so this one file can be copied to any machine with Python 3.10+.

    gpuctl login --url http://portal:8000            # asks for an API token (portal → Tokens)
    gpuctl submit --gpus 2 --mem 40G --priority high --tenant acme -- python train.py
    gpuctl submit -- 'python prep.py && python train.py'   # ONE argument: a shell command line
    gpuctl submit train.sh                            # a batch script: its #GPUCTL lines are options
    gpuctl submit --nodes 2 --gpus-per-node 8 -- torchrun ... ; --dependency afterok:12 ; --array 0-99%8
    gpuctl queue                                      # your tenants' pending and running tasks
    gpuctl show 42 ; gpuctl logs -f 42 (newest lines, then follows) ; gpuctl cancel 42
    gpuctl gpus ; gpuctl quota                        # --json on every listing

Configuration: $GPUCTL_CONFIG or ~/.config/gpuctl/config.json (mode 0600), holding
{"url": ..., "token": ...}; $GPUCTL_URL and $GPUCTL_TOKEN (or --url/--token, before or after
the subcommand) override it.
Errors print one line on stderr and exit non-zero (1: the portal said no or is unreachable,
2: bad command line). Messages are in Chinese when $LANGUAGE/$LC_ALL/$LC_MESSAGES/$LANG says zh
(the portal is asked for the same language, so its errors come back translated too).
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import re
import shlex
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

USER_AGENT = "gpuctl/1"
ACTIVE = "pending,assigned,running"


# --- language ---------------------------------------------------------------------------
# One stdlib-only file carries its own small catalogue (it is copied to machines that have
# no portal checkout); the portal translates its own messages for the Accept-Language sent.

def user_language() -> str:
    for var in ("LANGUAGE", "LC_ALL", "LC_MESSAGES", "LANG"):
        value = os.environ.get(var, "")
        if value and value not in ("C", "POSIX"):
            return "zh-hans" if value.lower().startswith("zh") else "en"
    return "en"


ZH_HANS = {
    "cannot reach the portal at {url}: {why}": "无法连接门户 {url}：{why}",
    "the portal answered HTTP {status}": "门户返回 HTTP {status}",
    "not logged in or bad token ({text}); run: gpuctl login": "未登录或令牌无效（{text}）；请运行：gpuctl login",
    "no such task (or it belongs to a tenant you are not in)": "没有这个任务（或它属于你不在的租户）",
    "cannot read {path}: {why}": "无法读取 {path}：{why}",
    "give the portal's address: gpuctl login --url http://HOST:PORT": "请给出门户地址：gpuctl login --url http://HOST:PORT",
    "no token given": "没有给出令牌",
    "logged in to {url} (tenants: {tenants}); saved to {path}": "已登录 {url}（租户：{tenants}）；已保存到 {path}",
    "no tenant yet": "还没有租户",
    "no command given: gpuctl submit [options] -- COMMAND [ARGS...]":
        "没有给出命令：gpuctl submit [选项] -- 命令 [参数...]",
    "not logged in: run gpuctl login --url http://HOST:PORT": "未登录：请运行 gpuctl login --url http://HOST:PORT",
    "({shown} of {count} shown; --limit to see more)": "（显示 {shown} / {count} 个；用 --limit 查看更多）",
    "task {id}: {error}": "任务 {id}：{error}",
    "--- attempt {n} ---": "--- 第 {n} 次尝试 ---",
    "ID": "编号", "NAME": "名称", "TENANT": "租户", "STATE": "状态", "PRIORITY": "优先级", "GPUS": "GPU", "POS": "位置",
    "REASON/SERVER": "原因/服务器", "GPU": "GPU", "MODEL": "型号", "MEM USED/TOTAL MB": "显存 已用/总量 MB",
    "UTIL": "利用率", "TEMP": "温度", "GPU MEM MB": "显存 MB", "RUNNING": "运行中", "PENDING": "排队",
    "MAX PRIO": "最高优先级", "CLASSES": "类别", "FAIR SHARE": "公平份额",
    # Batch scripts, arrays, usage, reservations and quota grants (issues 11-13).
    "cannot read the batch script {path}: {why}": "无法读取批处理脚本 {path}：{why}",
    "{path}:{number}: cannot read the {directive} line: {why}": "{path}:{number}：无法解析 {directive} 行：{why}",
    "{path}: bad {directive} option: {message}": "{path}：{directive} 选项有误：{message}",
    "{path}: {directive} lines take options only, not a command": "{path}：{directive} 行只能写选项，不能写命令",
    "array {id} (first task {first})": "任务数组 {id}（第一个任务 {first}）",
    "array {id}: {counts}": "任务数组 {id}：{counts}",
    "GPU usage {start} - {end} (GPU-hours; utilisation: mean reported by the agents)":
        "GPU 用量 {start} - {end}（GPU 小时；利用率：代理上报的平均值）",
    "GPU-HOURS": "GPU 小时", "GPU-MEM GB-H": "显存 GB 小时", "USER": "用户", "GPU MODEL": "GPU 型号",
    "SERVER": "服务器",
    "WORKLOAD CLASS": "负载类别", "TASK": "任务",
    "total: {hours} GPU-hours": "合计：{hours} GPU 小时",
    "bad time {text!r} (e.g. 2026-12-01 09:00, UTC)": "时间 {text!r} 有误（例如 2026-12-01 09:00，UTC）",
    "reservation {name} (#{id}) {state}": "预约 {name}（#{id}）{state}",
    "START": "开始", "END": "结束", "WEEKLY": "每周重复", "STATUS": "状态",
    "quota grant #{id} for {tenant} {state}: {text}": "租户 {tenant} 的临时配额 #{id} {state}：{text}",
    # Task states (the queue's STATE column and an array's counts), as the portal words them.
    "pending": "等待中", "assigned": "已分配", "running": "运行中", "succeeded": "成功", "failed": "失败",
    "cancelled": "已取消", "timed_out": "超时",
}


def _(text: str, /, **values: Any) -> str:
    """``text`` in the user's language, with ``{name}`` values filled in."""
    if user_language() == "zh-hans":
        text = ZH_HANS.get(text, text)
    return text.format(**values) if values else text


class CliError(Exception):
    """One line for the user; exit status 1."""


# --- configuration -------------------------------------------------------------------


def config_path() -> Path:
    env = os.environ.get("GPUCTL_CONFIG")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "gpuctl" / "config.json"


def load_config() -> dict[str, str]:
    path = config_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise CliError(_("cannot read {path}: {why}", path=path, why=exc)) from None
    return data if isinstance(data, dict) else {}


def save_config(data: dict[str, str]) -> Path:
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Created 0600 from the start: the token never sits in a world-readable file.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.chmod(path, 0o600)
    return path


# --- HTTP ----------------------------------------------------------------------------


class Client:
    def __init__(self, url: str, token: str, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None, params: dict[str, Any] | None = None,
                accept: str = "application/json") -> Any:
        url = f"{self.url}/api/v1/{path.lstrip('/')}"
        if params:
            query = {k: v for k, v in params.items() if v not in (None, "")}
            if query:
                url += "?" + urllib.parse.urlencode(query)
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Token {self.token}", "Accept": accept, "User-Agent": USER_AGENT,
                   "Accept-Language": user_language()}
        if data is not None:
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)  # noqa: S310 (URL is the user's)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise CliError(describe_error(exc.code, exc.read())) from None
        except urllib.error.URLError as exc:
            raise CliError(_("cannot reach the portal at {url}: {why}", url=self.url, why=exc.reason)) from None
        except (TimeoutError, ConnectionError) as exc:
            raise CliError(_("cannot reach the portal at {url}: {why}", url=self.url, why=exc)) from None
        if accept != "application/json":
            return raw.decode()
        return json.loads(raw) if raw else None

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, body=body)


def _flatten(errors: Any, prefix: str = "") -> list[str]:
    if isinstance(errors, dict):
        out = []
        for key, value in errors.items():
            name = "" if key in ("detail", "non_field_errors") else str(key)
            out += _flatten(value, f"{prefix}{name}" if not prefix or not name else f"{prefix}.{name}")
        return out
    if isinstance(errors, list):
        if all(isinstance(e, str) for e in errors):
            return [f"{prefix}: {' '.join(errors)}" if prefix else " ".join(errors)]
        out = []
        for i, item in enumerate(errors):
            if item:
                out += _flatten(item, f"{prefix}[{i}]")
        return out
    return [f"{prefix}: {errors}" if prefix else str(errors)]


def describe_error(status: int, raw: bytes) -> str:
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if body is None:
        return _("the portal answered HTTP {status}", status=status)
    text = "; ".join(_flatten(body)) or f"HTTP {status}"
    if status == 401:
        return _("not logged in or bad token ({text}); run: gpuctl login", text=text)
    if status == 404:
        return _("no such task (or it belongs to a tenant you are not in)")
    return text


# --- parsing helpers -------------------------------------------------------------------

_MEM = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
_DURATION = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$", re.IGNORECASE)


def parse_memory(text: str) -> int:
    """'40G' / '40GiB' / '40GB' -> 40960 MB; '512M' or a bare number -> MB."""
    m = _MEM.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"bad memory size {text!r} (e.g. 40G, 24000M)")
    value, unit = float(m.group(1)), m.group(2).upper()
    mb = value * {"": 1, "K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}[unit]
    if mb < 1:
        raise argparse.ArgumentTypeError(f"memory size {text!r} is under 1 MB")
    return int(mb)


def parse_duration(text: str) -> int:
    """'3600' / '90m' / '2h' / '1d' -> seconds."""
    m = _DURATION.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"bad duration {text!r} (e.g. 3600, 90m, 2h)")
    return int(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2).lower()]


def parse_env(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"bad --env {text!r} (expected KEY=VALUE)")
    return key, value


def table(rows: list[list[Any]], headers: list[str]) -> str:
    cells = [[("-" if v is None else str(v)) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def emit_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


# --- commands --------------------------------------------------------------------------


def cmd_login(args: argparse.Namespace) -> int:
    url = args.url or os.environ.get("GPUCTL_URL") or load_config().get("url")
    if not url:
        raise CliError(_("give the portal's address: gpuctl login --url http://HOST:PORT"))
    token = args.token or os.environ.get("GPUCTL_TOKEN")
    if not token:
        if not sys.stdin.isatty():
            token = sys.stdin.readline().strip()
        else:
            token = getpass.getpass("API token (create one on the portal's Tokens page): ").strip()
    if not token:
        raise CliError(_("no token given"))
    quotas = Client(url, token).get("quota")  # proves the URL and the token work
    path = save_config({"url": url.rstrip("/"), "token": token})
    tenants = ", ".join(q["tenant"] for q in quotas) or _("no tenant yet")
    print(_("logged in to {url} (tenants: {tenants}); saved to {path}", url=url, tenants=tenants, path=path))
    return 0


def task_command(words: list[str]) -> str | list[str]:
    """The rule, as ``sbatch --wrap``: ONE word after ``--`` is a shell command line
    (``'echo a; sleep 1'`` runs under ``sh -c`` as written); several words are a program
    and its arguments, each passed as given (quoted for the shell by the portal)."""
    return words[0] if len(words) == 1 else words
DIRECTIVE = "#GPUCTL"


def read_script(path: str, parser: argparse.ArgumentParser) -> tuple[str, argparse.Namespace]:
    """A batch script's text and the options of its ``#GPUCTL`` lines (like ``#SBATCH``): read from the
    top, past the #! line, comments and blank lines, up to the first command."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(_("cannot read the batch script {path}: {why}", path=path, why=exc)) from None
    words: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith(DIRECTIVE):
            try:
                words += shlex.split(stripped[len(DIRECTIVE):])
            except ValueError as exc:
                raise CliError(_("{path}:{number}: cannot read the {directive} line: {why}", path=path, number=number,
                                   directive=DIRECTIVE, why=exc)) from None
        elif stripped and not stripped.startswith("#"):
            break
    def refuse(message: str):
        raise CliError(_("{path}: bad {directive} option: {message}", path=path, directive=DIRECTIVE, message=message))

    usual, parser.error = parser.error, refuse  # one line naming the script, not argparse's usage
    try:
        directives = parser.parse_args(words)
    finally:
        parser.error = usual
    if directives.command:
        raise CliError(_("{path}: {directive} lines take options only, not a command", path=path, directive=DIRECTIVE))
    return text, directives


def script_command(path: str, text: str, args: list[str]) -> str:
    """Run the uploaded script under its #! interpreter (sh without one), named as the file,
    with its arguments: the task's command carries the whole script."""
    first = text.splitlines()[0] if text else ""
    interpreter = shlex.split(first[2:]) if first.startswith("#!") else ["/bin/sh"]
    if interpreter and interpreter[0] == "/usr/bin/env" and len(interpreter) > 1:
        interpreter = interpreter[1:]
    return shlex.join([*interpreter[:2], "-c", text, Path(path).name, *args])


def cmd_submit(args: argparse.Namespace, client: Client) -> int:
    command = list(args.command)
    script = None
    if command and command[0] == "--":
        command = command[1:]
    elif command and Path(command[0]).is_file():
        # gpuctl submit train.sh [ARGS]: its #GPUCTL options first, the command line's override them.
        text, directives = read_script(command[0], args.submit_parser)
        for key, value in vars(directives).items():
            if key == "env":
                args.env = [*(value or []), *(args.env or [])]
            elif getattr(args, key, None) in (None, False) and value not in (None, False):
                setattr(args, key, value)
        script = command[0]
        command = script_command(command[0], text, command[1:])
    if not command:
        raise CliError(_("no command given: gpuctl submit [options] -- COMMAND [ARGS...]"))
    body: dict[str, Any] = {"command": command if isinstance(command, str) else task_command(command)}
    optional = {"tenant": args.tenant, "name": args.name or (Path(script).name if script else None),
                "priority": args.priority, "gpu_memory_mb": args.mem, "gpu_count": args.gpus,
                "workload_class": args.workload_class, "timeout_s": args.timeout, "working_dir": args.workdir,
                "model_name": args.model, "gpu_model": args.gpu_model, "nodes": args.nodes,
                "gpus_per_node": args.gpus_per_node, "topology_key": args.topology, "dependency": args.dependency,
                "array": args.array, "reservation": args.reservation}
    body.update({k: v for k, v in optional.items() if v is not None})
    if args.env:
        body["env"] = dict(args.env)
    if args.shared:
        body["share_mode"] = "shared"
    if args.dry_run:
        preview = client.post("tasks/preview", body)
        if args.json:
            emit_json(preview)
        else:
            print(preview["message"])
        return 0
    task = client.post("tasks", body)
    if args.json:
        emit_json(task)
    elif task.get("array_id"):
        print(_("array {id} (first task {first})", id=task["array_id"], first=task["id"]))
    else:
        print(task["id"])
    return 0


def _gpus(t: dict[str, Any]) -> str:
    """"2x8" for a gang of 2 servers with 8 GPUs each, else the GPU count."""
    return f"{t['nodes']}x{t['gpus_per_node']}" if t.get("nodes", 1) > 1 else str(t["gpu_count"])


def fold_arrays(tasks: list[dict[str, Any]]) -> list[list[Any]]:
    """Queue rows: one per task, and one per array with its elements counted by state."""
    rows: list[list[Any]] = []
    arrays: dict[int, list[Any]] = {}
    counts: dict[int, dict[str, int]] = {}
    for t in tasks:
        array_id = t.get("array_id")
        if array_id is None:
            rows.append([t["id"], t["name"][:24], t["tenant"], _(t["status"]), t["priority"], _gpus(t),
                         t["queue_position"], t["pending_reason"] or t["server"] or t["failure_reason"] or ""])
            continue
        if array_id not in arrays:
            arrays[array_id] = [f"{array_id}[]", t["name"][:24], t["tenant"], "", t["priority"], _gpus(t),
                                t["queue_position"], t["pending_reason"] or ""]
            counts[array_id] = {}
            rows.append(arrays[array_id])
        row = arrays[array_id]
        counts[array_id][t["status"]] = counts[array_id].get(t["status"], 0) + 1
        if t["queue_position"] is not None and (row[6] is None or t["queue_position"] < row[6]):
            row[6] = t["queue_position"]
        row[7] = row[7] or t["pending_reason"] or ""
    for array_id, row in arrays.items():
        row[3] = ",".join(f"{n} {_(state)}" for state, n in sorted(counts[array_id].items()))
    return rows


def cmd_queue(args: argparse.Namespace, client: Client) -> int:
    status = args.status or (None if args.all else ACTIVE)
    page = client.get("tasks", status=status, tenant=args.tenant, mine="true" if args.mine else None,
                      ordering="queue" if not args.all else "-created_at", limit=args.limit)
    tasks = page["results"]
    if args.json:
        emit_json(tasks)
        return 0
    rows = fold_arrays(tasks)
    print(table(rows, [_(h) for h in ["ID", "NAME", "TENANT", "STATE", "PRIORITY", "GPUS", "POS", "REASON/SERVER"]]))
    if page.get("count", 0) > len(tasks):
        print(_("({shown} of {count} shown; --limit to see more)", shown=len(tasks), count=page["count"]))
    return 0


def cmd_show(args: argparse.Namespace, client: Client) -> int:
    if args.array:
        array = client.get(f"arrays/{args.id}")
        if args.json:
            emit_json(array)
        else:
            for key in ("id", "name", "tenant", "submitter", "spec", "size", "throttle", "created_at"):
                print(f"{key + ':':17}{array[key]}")
            print(f"{'counts:':17}{', '.join(f'{n} {s}' for s, n in array['counts'].items())}")
        return 0
    task = client.get(f"tasks/{args.id}")
    if args.json:
        task["events"] = client.get(f"tasks/{args.id}/events")
        emit_json(task)
        return 0
    keys = ["id", "name", "tenant", "submitter", "status", "pending_reason", "queue_position", "priority",
            "workload_class", "gpu_count", "nodes", "gpus_per_node", "topology_key", "array_id", "array_index",
            "gpu_memory_mb", "share_mode", "server", "gpus", "command", "timeout_s",
            "exit_code", "failure_reason", "attempt", "created_at", "started_at", "finished_at"]
    for key in keys:
        value = task.get(key)
        if key == "nodes" and value == 1:
            continue
        if key == "gpus_per_node" and task.get("nodes", 1) == 1:
            continue
        if value not in (None, "", []):
            print(f"{key + ':':17}{', '.join(value) if isinstance(value, list) else value}")
    for rank in task.get("ranks") or []:
        print(f"{'rank ' + str(rank['rank']) + ':':17}{rank['server']}"
              + (f" (exit {rank['exit_code']})" if rank["exit_code"] is not None else ""))
    for kind, ids in (task.get("dependency") or {}).items():
        print(f"{kind + ':':17}{', '.join(str(i) for i in ids)}")
    return 0


def cmd_logs(args: argparse.Namespace, client: Client) -> int:
    # Like tail(1): open at the newest lines (or the whole log with --all), then follow.
    rank = args.rank or None  # a gang's server; rank 0 by default
    if args.all:
        page = client.get(f"tasks/{args.id}/logs", offset=0, rank=rank)
        sys.stdout.write(page["data"])
        while page["data"]:  # the log comes in pages of at most 1 MiB
            page = client.get(f"tasks/{args.id}/logs", offset=page["next_offset"], attempt=page["attempt"],
                              rank=rank)
            sys.stdout.write(page["data"])
    else:
        page = client.get(f"tasks/{args.id}/logs", tail=args.tail or 100, rank=rank)
        sys.stdout.write(page["data"])
    sys.stdout.flush()
    while args.follow:
        if page["final"] and not page["data"]:
            break
        was_final = page["final"]
        if not page["data"]:
            time.sleep(args.interval)
        attempt = page["attempt"]
        # No attempt pinned: a requeued task's new attempt starts a new log from offset 0.
        page = client.get(f"tasks/{args.id}/logs", offset=page["next_offset"], rank=rank)
        if page["attempt"] != attempt:
            sys.stdout.write(_("--- attempt {n} ---", n=page["attempt"] + 1) + "\n")  # counted from 1, as on the page
            page = client.get(f"tasks/{args.id}/logs", offset=0, attempt=page["attempt"], rank=rank)
        sys.stdout.write(page["data"])
        sys.stdout.flush()
        if was_final and not page["data"]:
            break
    return 0


def cmd_cancel(args: argparse.Namespace, client: Client) -> int:
    if args.array:
        for array_id in args.ids:
            array = client.post(f"arrays/{array_id}/cancel")
            counts = ", ".join(f"{n} {s}" for s, n in array["counts"].items())
            print(_("array {id}: {counts}", id=array["id"], counts=counts))
        return 0
    failed = 0
    for task_id in args.ids:
        try:
            task = client.post(f"tasks/{task_id}/cancel")
            print(f"{task['id']} {task['status']}")
        except CliError as exc:
            print(f"gpuctl: error: {_('task {id}: {error}', id=task_id, error=exc)}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


def cmd_gpus(args: argparse.Namespace, client: Client) -> int:
    gpus = client.get("gpus", state=args.state, server=args.server)
    if args.json:
        emit_json(gpus)
        return 0
    rows = [[f"{g['server']}:{g['index']}", g["model_name"], g["state"],
             f"{g['memory_used_mb']}/{g['memory_total_mb']}", f"{g['utilization_pct']}%", f"{g['temperature_c']}C"]
            for g in gpus]
    print(table(rows, [_(h) for h in ["GPU", "MODEL", "STATE", "MEM USED/TOTAL MB", "UTIL", "TEMP"]]))
    return 0


def cmd_quota(args: argparse.Namespace, client: Client) -> int:
    quotas = client.get("quota")
    if args.json:
        emit_json(quotas)
        return 0
    rows = []
    for q in quotas:
        lim, use = q["limits"] or {}, q["usage"]
        rows.append([q["tenant"], f"{use['gpus']}/{lim.get('max_gpus', '-')}",
                     f"{use['gpu_memory_mb']}/{lim.get('max_gpu_memory_mb', '-')}",
                     f"{use['running_tasks']}/{lim.get('max_running_tasks', '-')}",
                     f"{use['pending_tasks']}/{lim.get('max_pending_tasks', '-')}",
                     lim.get("max_priority", "-"), ",".join(lim.get("allowed_classes", [])),
                     f"{q['fair_share']['factor']:.2f}" if q.get("fair_share") else "-"])
    print(table(rows, [_(h) for h in ["TENANT", "GPUS", "GPU MEM MB", "RUNNING", "PENDING", "MAX PRIO", "CLASSES",
                                        "FAIR SHARE"]]))
    return 0


def _hours(value: float) -> str:
    return f"{value:,.2f}"


def cmd_usage(args: argparse.Namespace, client: Client) -> int:
    params = {"from": args.start, "to": args.end, "group_by": args.group_by}
    if args.csv:
        sys.stdout.write(client.request("GET", "usage", params=params, accept="text/csv"))
        return 0
    report = client.get("usage", **params)
    if args.json:
        emit_json(report)
        return 0
    keys = report["group_by"]
    # sreport-like: a header saying what and when, a rule, then one line per group.
    print(_("GPU usage {start} - {end} (GPU-hours; utilisation: mean reported by the agents)", start=report["from"],
            end=report["to"]))
    print("-" * 80)
    rows = [[*(r[k] for k in keys), _hours(r["gpu_hours"]), _hours(r["gpu_memory_gb_hours"]),
             "-" if r["utilization_pct"] is None else f"{r['utilization_pct']:.0f}%"] for r in report["rows"]]
    total = sum(r["gpu_hours"] for r in report["rows"])
    print(table(rows, [*(_(k.upper().replace("_", " ")) for k in keys), *(_(h) for h in ["GPU-HOURS", "GPU-MEM GB-H",
                                                                                         "UTIL"])]))
    print(_("total: {hours} GPU-hours", hours=_hours(total)))
    return 0


def parse_when(text: str) -> str:
    """'2026-12-01 09:00' / '2026-12-01T09:00Z' (UTC unless an offset is given) -> ISO 8601."""
    from datetime import UTC, datetime

    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(_("bad time {text!r} (e.g. 2026-12-01 09:00, UTC)", text=text)) from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).isoformat()


def cmd_reserve(args: argparse.Namespace, client: Client) -> int:
    body: dict[str, Any] = {"name": args.name, "gpu_count": args.gpus, "starts_at": args.start,
                            "ends_at": args.end, "repeat_weeks": args.weekly, "reason": args.reason or ""}
    optional = {"tenant": args.tenant, "gpu_model": args.gpu_model}
    body.update({k: v for k, v in optional.items() if v is not None})
    if args.server:
        body["nodes"] = args.server
    if args.label:
        body["node_selector"] = dict(args.label)
    res = client.post("reservations", body)
    if args.json:
        emit_json(res)
    else:
        print(_("reservation {name} (#{id}) {state}", name=res["name"], id=res["id"], state=res["state"]))
    return 0


def cmd_reservations(args: argparse.Namespace, client: Client) -> int:
    rows = client.get("reservations", state=args.state)
    if args.json:
        emit_json(rows)
        return 0
    print(table([[r["id"], r["name"], r["tenant"], r["gpu_count"], r["starts_at"], r["ends_at"], r["repeat_weeks"],
                  r["status"]] for r in rows],
                [_(h) for h in ["ID", "NAME", "TENANT", "GPUS", "START", "END", "WEEKLY", "STATUS"]]))
    return 0


def cmd_grant_request(args: argparse.Namespace, client: Client) -> int:
    body: dict[str, Any] = {"starts_at": args.start, "ends_at": args.end, "reason": args.reason,
                            "extra_gpus": args.gpus, "extra_gpu_memory_mb": args.mem or 0,
                            "extra_running_tasks": args.tasks}
    if args.tenant:
        body["tenant"] = args.tenant
    grant = client.post("quota-grants", body)
    if args.json:
        emit_json(grant)
    else:
        print(_("quota grant #{id} for {tenant} {state}: {text}", id=grant["id"], tenant=grant["tenant"],
                state=grant["state"], text=grant["text"]))
    return 0


# --- argument parsing --------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's usual status)
        self.exit(2, f"gpuctl: error: {message} (see {self.prog} --help)\n")


def _add_connection_options(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument("--url", default=default, help="portal address (default: from the config file or $GPUCTL_URL)")
    parser.add_argument("--token", default=default,
                        help="API token (default: from the config file or $GPUCTL_TOKEN)")


def build_parser() -> argparse.ArgumentParser:
    # --url/--token go before or after the subcommand. The subcommand's copies default to
    # SUPPRESS so that, when absent, they do not overwrite a value given before it.
    common = argparse.ArgumentParser(add_help=False)
    _add_connection_options(common, argparse.SUPPRESS)
    listing = argparse.ArgumentParser(add_help=False)
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")

    parser = Parser(prog="gpuctl", description="Submit and follow GPU tasks on the portal.")
    _add_connection_options(parser, None)
    sub = parser.add_subparsers(dest="cmd", required=True, parser_class=Parser, metavar="COMMAND")

    sub.add_parser("login", parents=[common], help="save the portal address and an API token (0600 file)")

    p = sub.add_parser("submit", parents=[common, listing], help="submit a task; prints its id",
                       usage="gpuctl submit [options] -- COMMAND [ARGS...]")
    p.add_argument("--gpus", type=int, help="GPUs, default 1 (a multiple of a server's GPUs spans servers)")
    p.add_argument("--nodes", type=int, help="servers of a gang: one process per server, torchrun's rank variables")
    p.add_argument("--gpus-per-node", type=int, help="GPUs on each server of a gang")
    p.add_argument("--topology", help="a label all of a gang's servers share, e.g. rack")
    p.add_argument("--dependency", help="start after other tasks: afterok:12:13, afterany:14, afternotok:15")
    p.add_argument("--array", help="an array of tasks, e.g. 0-99%%8 (indexes, ranges, :step, %%throttle)")
    p.add_argument("--mem", type=parse_memory, help="GPU memory per GPU, e.g. 40G (default: whole GPUs)")
    p.add_argument("--priority", type=str.upper, choices=["LOW", "NORMAL", "HIGH", "CRITICAL"])
    p.add_argument("--tenant", help="tenant short name (needed if you belong to several)")
    p.add_argument("--name", help="task name (default: the program's name)")
    p.add_argument("--class", dest="workload_class", choices=["batch", "online"], help="workload class (batch)")
    p.add_argument("--timeout", type=parse_duration, help="e.g. 3600, 90m, 2h (default 1h)")
    p.add_argument("--env", type=parse_env, action="append", metavar="KEY=VALUE", help="repeatable")
    p.add_argument("--workdir", help="working directory on the GPU server")
    p.add_argument("--model", help="model name (memory estimate and GPU affinity)")
    p.add_argument("--gpu-model", help="GPU model substring, e.g. H100")
    p.add_argument("--shared", action="store_true", help="share GPUs with other tasks (needs --mem)")
    p.add_argument("--reservation", help="run only on this reservation's GPUs, inside its window")
    p.add_argument("--dry-run", action="store_true", help="submit nothing: say whether it would start now, or why not")
    p.add_argument("command", nargs=argparse.REMAINDER,
                   help="after --: the program and its arguments, or ONE quoted shell command line "
                        "(run by sh -c, like sbatch --wrap); or a batch script (its #GPUCTL lines are options)")
    p.set_defaults(submit_parser=p)

    p = sub.add_parser("queue", parents=[common, listing], help="pending and running tasks (like squeue)")
    p.add_argument("--all", action="store_true", help="every state, newest first")
    p.add_argument("--status", help="comma-separated states")
    p.add_argument("--tenant", help="comma-separated tenants")
    p.add_argument("--mine", action="store_true", help="only tasks I submitted")
    p.add_argument("--limit", type=int, default=100)

    p = sub.add_parser("show", parents=[common, listing], help="one task (or --array: an array) in detail")
    p.add_argument("id", type=int)
    p.add_argument("--array", action="store_true", help="ID is an array: its size, throttle and counts by state")

    p = sub.add_parser("logs", parents=[common], help="a task's output")
    p.add_argument("id", type=int)
    p.add_argument("-f", "--follow", action="store_true", help="keep printing until the task ends")
    p.add_argument("--tail", type=int, help="start with the last N lines (default 100)")
    p.add_argument("--all", action="store_true", help="start from the first line instead")
    p.add_argument("--rank", type=int, default=0, help="a gang's rank (server) whose output to show (default 0)")
    p.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)

    p = sub.add_parser("cancel", parents=[common], help="cancel tasks (or --array: every element of arrays)")
    p.add_argument("ids", type=int, nargs="+", metavar="ID")
    p.add_argument("--array", action="store_true", help="the IDs are arrays")

    p = sub.add_parser("gpus", parents=[common, listing], help="GPUs and their state")
    p.add_argument("--state", help="free, allocated, cordoned, reserved, error, unavailable")
    p.add_argument("--server")

    sub.add_parser("quota", parents=[common, listing], help="my tenants' limits and usage")

    p = sub.add_parser("usage", parents=[common, listing], help="GPU-hours used over a period (like sreport)")
    p.add_argument("--from", dest="start", help="start: YYYY-MM-DD or ISO 8601 (default: first of this month)")
    p.add_argument("--to", dest="end", help="end, exclusive (default: now)")
    p.add_argument("--group-by", default="tenant,user",
                   help="comma-separated: tenant, user, server, gpu_model, workload_class, task (default tenant,user)")
    p.add_argument("--csv", action="store_true", help="print CSV instead of a table")

    p = sub.add_parser("reserve", parents=[common, listing], help="request a GPU reservation (tenant admin)")
    p.add_argument("name", help="short name, e.g. paper-deadline (tasks name it with --reservation)")
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--start", type=parse_when, required=True, help="UTC, e.g. '2026-12-01 09:00'")
    p.add_argument("--end", type=parse_when, required=True)
    p.add_argument("--weekly", type=int, default=0, metavar="N", help="repeat weekly N more times")
    p.add_argument("--tenant")
    p.add_argument("--gpu-model", help="GPU model substring, e.g. H100")
    p.add_argument("--server", action="append", help="only this server (repeatable)")
    p.add_argument("--label", type=parse_env, action="append", metavar="KEY=VALUE", help="server label (repeatable)")
    p.add_argument("--reason")

    p = sub.add_parser("reservations", parents=[common, listing], help="my tenants' reservations")
    p.add_argument("--state", choices=["requested", "approved", "rejected", "released"])

    p = sub.add_parser("grant-request", parents=[common, listing], help="ask for temporary extra quota (tenant admin)")
    p.add_argument("--tenant")
    p.add_argument("--gpus", type=int, default=0, help="extra GPUs")
    p.add_argument("--mem", type=parse_memory, help="extra GPU memory, e.g. 160G")
    p.add_argument("--tasks", type=int, default=0, help="extra running tasks")
    p.add_argument("--start", type=parse_when, required=True, help="UTC, e.g. '2026-12-01 09:00'")
    p.add_argument("--end", type=parse_when, required=True)
    p.add_argument("--reason", required=True)
    return parser


COMMANDS = {"submit": cmd_submit, "queue": cmd_queue, "show": cmd_show, "logs": cmd_logs, "cancel": cmd_cancel,
            "gpus": cmd_gpus, "quota": cmd_quota, "usage": cmd_usage, "reserve": cmd_reserve,
            "reservations": cmd_reservations, "grant-request": cmd_grant_request}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "login":
            return cmd_login(args)
        config = load_config()
        url = args.url or os.environ.get("GPUCTL_URL") or config.get("url")
        token = args.token or os.environ.get("GPUCTL_TOKEN") or config.get("token")
        if not url or not token:
            raise CliError(_("not logged in: run gpuctl login --url http://HOST:PORT"))
        return COMMANDS[args.cmd](args, Client(url, token))
    except CliError as exc:
        print(f"gpuctl: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
