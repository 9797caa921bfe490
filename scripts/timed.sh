# Sourced by the toy scripts: timed NAME command... runs it and remembers its wall time in TIMES.
TIMES=()
timed() {
  local name=$1; shift
  local start=$SECONDS
  echo "== $name" >&2
  "$@"
  TIMES+=("| $name | $((SECONDS - start)) |")
}
