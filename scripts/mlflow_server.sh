#!/usr/bin/env bash
# The team's MLflow tracking server: PostgreSQL backend store, artifacts proxied by the server.
#
#   MLFLOW_BACKEND_STORE_URI=postgresql://mlflow:SECRET@db.internal:5432/mlflow make mlflow-server
#   # clients (training, tune workers, `pix2seq predict`): MLFLOW_TRACKING_URI=http://<host>:<port>
#
# Environment:
#   MLFLOW_BACKEND_STORE_URI      required: postgresql://USER[:PASSWORD]@HOST[:PORT]/DB (run through
#                                 psycopg2: postgresql+psycopg2://; another driver: postgresql+DRIVER://)
#   MLFLOW_ARTIFACTS_DESTINATION  where the server stores artifacts (default ./mlartifacts; s3://..., gs://...)
#   MLFLOW_HOST                   interface to bind (default 127.0.0.1; 0.0.0.0 to serve other machines)
#   MLFLOW_PORT                   default 5000
#   MLFLOW_WORKERS                server worker processes (default 2)
#   MLFLOW_ALLOWED_HOSTS          extra Host headers to accept, e.g. mlflow.internal,10.0.0.5:5000
#                                 (MLflow accepts localhost and private IPs by default)
#   MLFLOW_BIN                    the mlflow executable (default: the repository's .venv/bin/mlflow)
#
# Runs in the foreground (exec: the PID is the server's; stop it with SIGTERM to its process group).
# The database schema is created/migrated on first start.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
die() { echo "mlflow-server: error: $*" >&2; exit 2; }

uri="${MLFLOW_BACKEND_STORE_URI:-}"
[[ -n "$uri" ]] || die "MLFLOW_BACKEND_STORE_URI is not set (e.g. postgresql://mlflow:PASSWORD@127.0.0.1:5432/mlflow)"
case "$uri" in
  # SQLAlchemy >= 2.1 maps a bare postgresql:// to psycopg 3; the project installs psycopg2(-binary)
  postgresql://*) uri="postgresql+psycopg2://${uri#postgresql://}" ;;
  postgresql+*://*) ;;  # an explicit driver: postgresql+psycopg2://, postgresql+psycopg://
  postgres://*) die "MLFLOW_BACKEND_STORE_URI: SQLAlchemy needs the scheme postgresql://, not postgres://" ;;
  *) die "MLFLOW_BACKEND_STORE_URI: expected a PostgreSQL URI postgresql://..., got '${uri%%://*}://...'" ;;
esac

dest="${MLFLOW_ARTIFACTS_DESTINATION:-./mlartifacts}"
if [[ "$dest" != *://* ]]; then  # a local folder: absolute, so the server's cwd does not matter
  mkdir -p "$dest"
  dest="$(cd "$dest" && pwd)"
fi
host="${MLFLOW_HOST:-127.0.0.1}"
port="${MLFLOW_PORT:-5000}"
workers="${MLFLOW_WORKERS:-2}"
[[ "$port" =~ ^[0-9]+$ ]] || die "MLFLOW_PORT: expected a port number, got '$port'"
[[ "$workers" =~ ^[1-9][0-9]*$ ]] || die "MLFLOW_WORKERS: expected a positive number, got '$workers'"

mlflow_bin="${MLFLOW_BIN:-$repo/.venv/bin/mlflow}"
if [[ ! -x "$mlflow_bin" ]]; then
  mlflow_bin="$(command -v mlflow || true)"
  [[ -n "$mlflow_bin" ]] || die "mlflow not found (run 'make setup', or set MLFLOW_BIN)"
fi

extra=()
[[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]] && extra+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")

safe_uri="$(sed -E 's#(://[^:/@]+):.*@#\1:***@#' <<<"$uri")"  # never print the password
echo "mlflow-server: store $safe_uri, artifacts $dest, http://$host:$port ($workers workers)" >&2
export MLFLOW_DISABLE_TELEMETRY="${MLFLOW_DISABLE_TELEMETRY:-true}"
exec "$mlflow_bin" server \
  --backend-store-uri "$uri" \
  --artifacts-destination "$dest" \
  --serve-artifacts \
  --host "$host" \
  --port "$port" \
  --workers "$workers" \
  "${extra[@]}"
