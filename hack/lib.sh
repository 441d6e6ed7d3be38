# Shared by the hack/ scripts: paths and the project's virtualenv.
set -euo pipefail
CRIB_SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CRIB_VENV="${CRIB_VENV:-$CRIB_SRC/.venv}"
CRIB_PY="$CRIB_VENV/bin/python"
log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
need_root() { [ "$(id -u)" = 0 ] || { echo "$0: run as root (sudo $0 $*)" >&2; exit 1; }; }
