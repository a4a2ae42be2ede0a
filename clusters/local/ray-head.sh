#!/usr/bin/env bash
# A local Ray head for job mode: dashboard + job server on 127.0.0.1 only, token authentication on.
#
#   bash clusters/local/ray-head.sh                  # foreground; Ctrl-C stops it (and only it)
#   t2v flow run-once --input runs/incoming --set cluster.address=http://127.0.0.1:8265
#
# The job server is part of Ray's dashboard (the ray[default] extra). The token is created once in
# ~/.ray/auth_token (or $RAY_AUTH_TOKEN_PATH); clients of this machine read it from there (flows/jobs.py does).
# Set RAY_DASHBOARD_HOST=0.0.0.0 only if other machines must submit jobs, and only behind a firewall.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="${T2V_VENV:-$root/.venv}"
port="${RAY_DASHBOARD_PORT:-8265}"
host="${RAY_DASHBOARD_HOST:-127.0.0.1}"
token="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
if [ ! -s "$token" ]; then
  mkdir -p "$(dirname "$token")"
  (umask 077; "$venv/bin/python" -c 'import secrets; print(secrets.token_hex(32))' > "$token")
  echo "[ray-head] created an auth token in $token" >&2
fi
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$token" RAY_USAGE_STATS_ENABLED=0
# a worker per curation decode-task slot (tasks ask for 0.5 CPU; see pipelines/curation/job.py local_ray_system_config)
export RAY_num_workers_soft_limit="${RAY_num_workers_soft_limit:-$(( 2 * $(nproc) ))}"
# workers at the services' niceness, not Ray's 15 (see pipelines/local_ray.py: few cores, preempted training threads)
export RAY_worker_niceness="${RAY_worker_niceness:-0}"
# `python` in a job must be the project's interpreter
export PATH="$venv/bin:$PATH"
echo "[ray-head] job server: http://$host:$port (Ctrl-C stops this head)" >&2
exec "$venv/bin/ray" start --head --block --node-ip-address=127.0.0.1 --port="${RAY_GCS_PORT:-6379}" \
  --dashboard-host="$host" --dashboard-port="$port" --include-dashboard=true --disable-usage-stats \
  --temp-dir="${RAY_TEMP_DIR:-/tmp/ray-t2v}" "$@"
