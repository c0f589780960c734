#!/usr/bin/env bash
# Submit one fmlray run (the digits preset on the Ray engine) to a Ray cluster's
# job server and follow its log. Run from anywhere; it uploads the repository
# root as the job's working_dir (Ray skips what .gitignore lists: .venv, runs/, data/).
#
#   cluster/submit-example.sh                       # dashboard on localhost:8265
#   cluster/submit-example.sh --set run.rounds=2    # extra args go to `fmlray run`
#   RAY_API_SERVER_ADDRESS=http://127.0.0.1:8265 cluster/submit-example.sh
#
# The address is a local `ray start --head`, or a remote cluster's dashboard
# tunnelled to localhost (`ray dashboard cluster/gpu-cluster.yaml`, or
# `kubectl port-forward svc/<raycluster>-head-svc 8265:8265`).
#
# The run is written under /tmp/fmlray-runs/digits-fml/ (an absolute path: a
# relative one would land in the job's temporary working_dir copy). That suits a
# one-node head; on a cluster whose actors run on other nodes the run folder must
# be storage every node shares: add e.g. --set run.output_dir=/efs/fmlray-runs
# (a later --set of a key wins).
#
# Token authentication (Ray 2.60, checked against the installed ray package):
# - `ray start --head` turns token auth on when RAY_AUTH_MODE=token is set, or
#   when RAY_AUTH_MODE is unset and a token file already exists (~/.ray/auth_token,
#   e.g. written by an earlier local `ray.init()`, which enables token auth by
#   default and generates that file). A job server started that way answers
#   401 "Unauthorized: Missing authentication token" to clients that send none.
# - The `ray job` CLI sends "Authorization: Bearer <token>" ONLY when its own
#   environment has RAY_AUTH_MODE=token; it does not turn this on by itself.
# - The token is read from RAY_AUTH_TOKEN, else the file named by
#   RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token. `ray get-auth-token` prints it.
# So on the head machine itself `export RAY_AUTH_MODE=token` is enough; from
# another machine also `export RAY_AUTH_TOKEN=<the cluster's token>`. Sending a
# token to a cluster without token auth is harmless, hence the default below.
set -euo pipefail

cd "$(dirname "$0")/.."

ADDRESS="${RAY_API_SERVER_ADDRESS:-http://127.0.0.1:8265}"
if [[ -z "${RAY_AUTH_MODE:-}" && ( -n "${RAY_AUTH_TOKEN:-}" || -s "$HOME/.ray/auth_token" ) ]]; then
    export RAY_AUTH_MODE=token
fi

JOB_ID="fmlray-digits-$(date +%Y%m%d-%H%M%S)"

ray job submit --address "$ADDRESS" --submission-id "$JOB_ID" --no-wait --working-dir . -- \
    python -m fmlray run --config fmlray/presets/digits.toml \
    --set engine.kind=ray \
    --set run.output_dir=/tmp/fmlray-runs \
    "$@"

# Stream the driver's output until the job ends (Ctrl-C stops following, not the job).
ray job logs --address "$ADDRESS" --follow "$JOB_ID"

# Final state ("Job '<id>' succeeded" / "failed" / ...); exit non-zero unless it succeeded.
status="$(ray job status --address "$ADDRESS" "$JOB_ID")"
echo "$status"
grep -q "' succeeded" <<<"$status"
