#!/usr/bin/env bash
# The whole system on one real GPU machine, once: embedded PostgreSQL, migrations, a tenant
# with a user and an API token, the web node (daphne), the scheduler and one agent reading
# the GPU through NVML (nvidia-ml-py, not --simulate); then a user submits a two-rank torch
# job with gpuctl and we check it ran on the GPU as an unprivileged account.
#
# Made for the lent H200 (root, no network, python3 with torch): the project's runtime
# wheels travel in .whl/ (git-ignored; see README.md beside this file for the list) and are
# installed into $DEVICE_CHECK_SITE. Run from anywhere:  bash deploy/device-check/run.sh
# Results (at most 7 small files) go to $OUT: summary.json, task.log, and the logs of
# setup, web, scheduler, agent and postgres. The last line printed is the verdict,
# "device-check: PASS ..." or "device-check: FAIL: <why>" (exit 1).
#
# DEVICE_CHECK_SIMULATE=1 rehearses it on a machine without a GPU: the agent gets
# --simulate 1xH200-141GB and the job runs on the CPU.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
ROOT=$PWD
HERE=$ROOT/deploy/device-check
START=$SECONDS

OUT=${OUT:-/tmp/device-check-out}
WORK=${DEVICE_CHECK_WORK:-/tmp/device-check}     # database, agent state, task dirs, job
SITE=${DEVICE_CHECK_SITE:-/tmp/site}
WHEELS=${DEVICE_CHECK_WHEELS:-$ROOT/.whl}
PORT=${DEVICE_CHECK_PORT:-18765}
SIMULATE=${DEVICE_CHECK_SIMULATE:-0}
PY=$(command -v "${DEVICE_CHECK_PYTHON:-python3}") || { echo "device-check: FAIL: no python3"; exit 1; }
# The job's interpreter, by absolute path: a task gets a minimal PATH, not ours.
TASK_PY=$(command -v "${DEVICE_CHECK_TASK_PYTHON:-$PY}") || { echo "device-check: FAIL: no task python"; exit 1; }
SERVER=devcheck-gpu
TENANT=devcheck
USERNAME=devcheck-user          # no Unix account of that name: the tenant's account runs the job
ACCOUNT=gpu-$TENANT

mkdir -p "$OUT" || exit 1
SETUP_LOG=$OUT/setup.log
: >"$SETUP_LOG"
NAMES=() PIDS=() MADE_ACCOUNT=0 FAIL_MSG="" VERDICT=""

note() { echo "device-check: $* (+$((SECONDS - START)) s)"; echo "$((SECONDS - START)) $*" >>"$SETUP_LOG"; }
fail() { FAIL_MSG=$*; exit 1; }
last_line() { grep -v '^\s*$' "$1" 2>/dev/null | tail -n 1 | cut -c1-300; }

start() {  # start NAME COMMAND...: a child whose output is $OUT/NAME.log
    local name=$1; shift
    "$@" >"$OUT/$name.log" 2>&1 &
    NAMES+=("$name") PIDS+=($!)
}

cleanup() {
    local rc=$? i pid
    [ "$rc" != 0 ] && [ -z "$FAIL_MSG" ] && FAIL_MSG="exit code $rc"
    # The agent first: --kill-tasks-on-exit stops a job still running.
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        pid=${PIDS[i]}
        kill -TERM "$pid" 2>/dev/null || continue
        for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -KILL "$pid" 2>/dev/null && echo "killed ${NAMES[i]} (no stop within 15 s)" >>"$SETUP_LOG"
        wait "$pid" 2>/dev/null
    done
    if [ -e "$WORK/pg/postmaster.pid" ]; then
        PORTAL_PGDATA=$WORK/pg "$PY" -m portal.embedded_db stop >>"$SETUP_LOG" 2>&1
    fi
    [ -f "$WORK/pg/log" ] && tail -c 100000 "$WORK/pg/log" >"$OUT/postgres.log"
    if [ "$MADE_ACCOUNT" = 1 ]; then  # with what torchrun left in /tmp under that account
        find /tmp -maxdepth 1 -name 'torchelastic_*' -user "$ACCOUNT" -exec rm -rf {} + 2>>"$SETUP_LOG"
        userdel "$ACCOUNT" >>"$SETUP_LOG" 2>&1
    fi
    # The summary says how far it got, also when the driver never ran or was stopped.
    FAIL_MSG=$FAIL_MSG "$PY" - "$OUT/summary.json" "$SETUP_LOG" "$((SECONDS - START))" <<'EOF'
import json, os, sys
path, steps, total = sys.argv[1], sys.argv[2], int(sys.argv[3])
try:
    summary = json.load(open(path))
except (OSError, ValueError):
    summary = {"result": "fail"}
if os.environ["FAIL_MSG"]:
    summary["result"], summary["error"] = "fail", summary.get("error") or os.environ["FAIL_MSG"]
summary["setup_steps_s"] = [line.rstrip("\n") for line in open(steps) if line[:1].isdigit()]
summary["total_s"] = total
json.dump(summary, open(path, "w"), indent=2, sort_keys=True)
EOF
    if [ "$rc" = 0 ] && [ -z "$FAIL_MSG" ]; then
        echo "device-check: PASS: ${VERDICT} (${SECONDS}s in all; results in $OUT)"
    else
        echo "device-check: FAIL: $FAIL_MSG"
        rc=1
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'FAIL_MSG="interrupted"; exit 1' INT TERM

# --- 1. the project's runtime packages, from carried wheels ------------------------------------
wheels=("$WHEELS"/*.whl)
[ -f "${wheels[0]}" ] || fail "no wheels in $WHEELS (download them first: README.md here)"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "${wheels[@]}" >>"$SETUP_LOG" 2>&1 || fail "pip install into $SITE: $(last_line "$SETUP_LOG")"
export PYTHONPATH=$SITE
note "installed ${#wheels[@]} wheels into $SITE with $PY ($("$PY" -V 2>&1))"
# What the driver itself says, to hold the agent's NVML readings against (its UUID must match).
SMI=""
if [ "$SIMULATE" != 1 ]; then
    SMI=$(nvidia-smi --query-gpu=uuid,name,memory.total,driver_version,compute_mode --format=csv,noheader \
          2>>"$SETUP_LOG") || SMI=""
    echo "nvidia-smi: ${SMI:-did not answer}" >>"$SETUP_LOG"
fi

# --- 2. a fresh embedded PostgreSQL and the schema --------------------------------------------
export PORTAL_PGDATA=$WORK/pg
[ -e "$PORTAL_PGDATA/postmaster.pid" ] && "$PY" -m portal.embedded_db stop >>"$SETUP_LOG" 2>&1
{ rm -rf "$WORK" && mkdir -p "$WORK" && chmod 755 "$WORK"; } || fail "cannot make $WORK"
unset REDIS_URL DATABASE_URL PORTAL_CONFIG  # the Postgres channel layer, the default policy
# A key of this run only: nothing is written into the working tree (var/secret_key).
SECRET_KEY=$("$PY" -c 'import secrets; print(secrets.token_urlsafe(50))') && export SECRET_KEY
# LC_ALL=C: initdb refuses a LANG whose locale the machine lacks.
DATABASE_URL=$(LC_ALL=C "$PY" -m portal.embedded_db start 2>>"$SETUP_LOG") || fail "embedded PostgreSQL: $(last_line "$SETUP_LOG")"
export DATABASE_URL
note "PostgreSQL up: $DATABASE_URL"
"$PY" manage.py migrate --noinput -v 0 >>"$SETUP_LOG" 2>&1 || fail "migrate: $(last_line "$SETUP_LOG")"
note "migrated"

# --- 3. what an operator sets up: the task account, a tenant, a user, tokens -------------------
# Tasks never run as root or as the agent: the tenant's account (uid >= 1000) runs this one.
if ! id "$ACCOUNT" >/dev/null 2>&1; then
    if useradd --no-create-home --shell /usr/sbin/nologin --user-group "$ACCOUNT" >>"$SETUP_LOG" 2>&1; then
        MADE_ACCOUNT=1
    else  # the agent then falls back to "nobody": still unprivileged, still checked below
        echo "useradd failed: the job will run as the fallback account nobody" >>"$SETUP_LOG"
    fi
fi
"$PY" "$HERE/check.py" seed --tenant "$TENANT" --user "$USERNAME" --token-file "$WORK/api-token" \
    --join-token-file "$WORK/join-token" >>"$SETUP_LOG" 2>&1 || fail "seed: $(last_line "$SETUP_LOG")"
note "tenant $TENANT, user $USERNAME, API token and join token made; task account $ACCOUNT"

# --- 4. the processes: web node, scheduler, one agent on the real GPU -------------------------
(exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && fail "port $PORT is in use (set DEVICE_CHECK_PORT)"
export DB_POOL_MAX_SIZE=8  # as make run and the systemd unit serve
start web env PORTAL_PROCESS_NAME=gpu-portal-web \
    "$PY" -m daphne -b 127.0.0.1 -p "$PORT" portal.asgi:application
start scheduler env PORTAL_PROCESS_NAME=gpu-portal-scheduler "$PY" manage.py runscheduler
# A GPU server's agent holds none of the portal's secrets. A heartbeat a second: NVML readings
# of the job's memory arrive while it runs.
agent=(--portal "http://127.0.0.1:$PORT" --name "$SERVER" --state-dir "$WORK/agent"
       --work-root "$WORK/task-work" --join-token-file "$WORK/join-token" --heartbeat-interval 1
       --grace-period 3 --kill-tasks-on-exit)
[ "$SIMULATE" = 1 ] && agent+=(--simulate 1xH200-141GB)
start agent env -u SECRET_KEY -u DATABASE_URL -u PORTAL_PGDATA -u DB_POOL_MAX_SIZE "$PY" -m nodes.agent "${agent[@]}"
note "started web (port $PORT), scheduler and agent$([ "$SIMULATE" = 1 ] && echo ' (simulated GPU)')"

# --- 5. a user's job: two torch ranks on the one GPU, submitted with gpuctl -------------------
# Readable by the task's account (not under /root, where the checkout may lie).
{ install -d -m 755 "$WORK/job" && install -m 644 "$HERE/job.py" "$WORK/job/job.py"; } || fail "cannot copy job.py"
# gloo binds to the loopback: the machine's hostname need not resolve. A task gets a clean
# environment, so where the image finds the CUDA driver through LD_LIBRARY_PATH, pass it on.
job_env=(--env "GLOO_SOCKET_IFNAME=lo" --env "DEVCHECK_SECONDS=${DEVICE_CHECK_JOB_SECONDS:-12}")
[ -n "${LD_LIBRARY_PATH:-}" ] && job_env+=(--env "LD_LIBRARY_PATH=$LD_LIBRARY_PATH")
[ "$SIMULATE" = 1 ] && job_env+=(--env "DEVCHECK_CPU=1")
for kv in ${DEVICE_CHECK_TASK_ENV:-}; do job_env+=(--env "$kv"); done  # e.g. PYTHONPATH of a rehearsal's torch
drive=(--url "http://127.0.0.1:$PORT" --token-file "$WORK/api-token" --server "$SERVER"
       --task-python "$TASK_PY" --job "$WORK/job/job.py" "${job_env[@]}" --timeout "${DEVICE_CHECK_TASK_TIMEOUT:-180}"
       --task-log "$OUT/task.log" --summary "$OUT/summary.json" --elapsed "$((SECONDS - START))")
[ "$SIMULATE" = 1 ] && drive+=(--simulate)
[ -n "$SMI" ] && drive+=(--nvidia-smi "$SMI")
"$PY" "$HERE/check.py" drive "${drive[@]}" 2>>"$SETUP_LOG" &
DRIVER=$!
# Meanwhile: a portal process that dies ends the check at once, not at the driver's timeout.
while kill -0 "$DRIVER" 2>/dev/null; do
    for i in "${!PIDS[@]}"; do
        if ! kill -0 "${PIDS[i]}" 2>/dev/null; then
            kill "$DRIVER" 2>/dev/null
            fail "${NAMES[i]} exited: $(last_line "$OUT/${NAMES[i]}.log")"
        fi
    done
    sleep 1
done
wait "$DRIVER"
drive_rc=$?
result=$("$PY" - "$OUT/summary.json" <<'EOF' 2>>"$SETUP_LOG"
import json, sys
s = json.load(open(sys.argv[1]))
if s.get("result") == "pass":
    r, m = s["job_reports"], s["gpu_memory_used_mb"]
    print(f"pass task {s['task_id']} succeeded: {len(r)} ranks on {r[0]['device']} as uid {r[0]['uid']}, "
          f"{sum(x['tflops'] for x in r):.0f} TFLOP/s together; GPU memory used {m['before']} -> "
          f"{m['peak_while_running']} MiB" + (f"; warning: {s['warning']}" if s.get("warning") else ""))
else:
    print("fail " + s.get("error", "no result"))
EOF
)
case "$result" in
    "pass "*) [ "$drive_rc" = 0 ] || fail "the driver exited $drive_rc"; VERDICT=${result#pass } ;;
    "fail "*) fail "${result#fail }" ;;
    *) fail "the driver stopped without a result: $(last_line "$SETUP_LOG")" ;;
esac
