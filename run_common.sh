# Shared by run_detection.sh and run_mitigation.sh (sourced after their hyperparameters: NUM_PROCESSES, PYTHON):
# one command per call, under accelerate's launcher when NUM_PROCESSES > 1, and two shell commands side by side.
LAUNCH=("$PYTHON")
if [ "$NUM_PROCESSES" -gt 1 ]; then
  LAUNCH=(accelerate launch --multi_gpu --num_processes "$NUM_PROCESSES" --num_machines 1 --mixed_precision no
          --dynamo_backend no)
  EXIT_DIR=$(mktemp -d)   # where launched processes leave the code they end with on bad input (utils/cli.py)
  trap 'rm -rf "$EXIT_DIR"' EXIT
fi

launch() {  # launch SCRIPT ARGS...: one command; under the launcher (NUM_PROCESSES > 1) its arguments are checked
            # once in one process first (--check_only: bad input is one error line and exit 2 before the launcher
            # starts), and a code a launched process left (2: bad input met inside a shard) replaces the
            # launcher's own exit code (1 whatever the processes' codes; docs/multi_gpu.md)
  if [ "$NUM_PROCESSES" -le 1 ]; then "$PYTHON" "$@"; return; fi
  "$PYTHON" "$@" --check_only > /dev/null || return
  local codes rc=0
  codes=$(mktemp -d "$EXIT_DIR/run.XXXXXX")
  MEMSHARP_EXIT_DIR="$codes" "${LAUNCH[@]}" "$@" || rc=$?
  if [ "$rc" -ne 0 ] && compgen -G "$codes/*.code" > /dev/null; then rc=$(sort -n "$codes"/*.code | tail -n 1); fi
  return "$rc"
}

together() {  # together F G: run shell commands F and G at once; the first to fail stops the other, and the
              # script ends with its exit code (2 for bad input)
  "$1" & local a=$!
  "$2" & local b=$!
  local rc=0 first=
  wait -n -p first "$a" "$b" || rc=$?
  if [ "$rc" -ne 0 ]; then
    for p in "$a" "$b"; do pkill -TERM -P "$p" 2>/dev/null || true; kill -TERM "$p" 2>/dev/null || true; done
    wait "$a" "$b" 2>/dev/null || true
    exit "$rc"
  fi
  wait "$([ "$first" = "$a" ] && echo "$b" || echo "$a")" || exit $?
}
