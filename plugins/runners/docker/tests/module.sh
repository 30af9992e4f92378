#!/bin/sh
# A mercure processing module in busybox's shell, for the docker runner's tests.
#
# It does what mercure's contract asks: reads $MERCURE_IN_DIR/task.json, copies the input
# instances to $MERCURE_OUT_DIR and writes a result.json that reports what the container
# saw: its uid and gid, the folders it was given, whether the "marker" setting of task.json
# reached it, and what happened when it tried to open a network connection.
#
# BEHAVIOUR (from the module's `environment`): copy (default), fail (exit 3), hang (sleep,
# dies on SIGTERM), stubborn (ignores SIGTERM), nothing (exit 0, no output), chatty (a long
# log, then copy), hungry (takes 200 MB of memory, then copy).
# SLEEP: seconds to sleep before writing. RUNS: a file to append "start"/"end" lines to.
set -u
in_dir="$MERCURE_IN_DIR"
out_dir="$MERCURE_OUT_DIR"
behaviour="${BEHAVIOUR:-copy}"
runs="${RUNS:-}"

[ -n "$runs" ] && echo "start $(date +%s)" >> "$runs"
echo "module starting: uid $(id -u) gid $(id -g) behaviour $behaviour"

case "$behaviour" in
  fail)
    echo "failing on purpose" >&2
    exit 3 ;;
  hang)
    echo "hanging"
    while true; do sleep 1; done ;;
  stubborn)
    trap 'echo "ignoring SIGTERM"' TERM
    echo "hanging and ignoring SIGTERM"
    while true; do sleep 1; done ;;
  nothing)
    echo "writing nothing"
    exit 0 ;;
  chatty)
    i=0
    while [ $i -lt 3000 ]; do echo "line $i of a long log"; i=$((i + 1)); done
    echo "the last line" ;;
  hungry)
    echo "taking 200 MB"
    big=$(head -c 200000000 /dev/zero | tr '\0' a)
    echo "got ${#big} bytes" ;;
esac

sleep "${SLEEP:-0}"

# process.settings (the merged settings) comes after module_config in task.json: the last one.
marker=$(grep -o '"marker": *"[^"]*"' "$in_dir/task.json" | tail -n 1 | sed 's/.*: *"\(.*\)"/\1/')
network=$(nc -w 3 192.0.2.1 9 < /dev/null 2>&1; echo "exit $?")
network=$(echo "$network" | tr '\n"\\' '   ')
count=0
for f in "$in_dir"/*.dcm; do
  [ -e "$f" ] || continue
  cp "$f" "$out_dir/"
  count=$((count + 1))
done
extra=""
[ -n "${EXTRA_FILE:-}" ] && extra=$(cat "$EXTRA_FILE" 2>&1 | tr '\n"\\' '   ')
printf '{"uid": %s, "gid": %s, "copied": %s, "marker": "%s", "network": "%s", ' \
  "$(id -u)" "$(id -g)" "$count" "$marker" "$network" > "$out_dir/result.json"
printf '"in_dir": "%s", "out_dir": "%s", "persistence": "%s", "extra": "%s"}\n' \
  "$in_dir" "$out_dir" "${MODULE_PERSISTENCE_DIR:-}" "$extra" >> "$out_dir/result.json"
echo "copied $count instance(s)"
[ -n "$runs" ] && echo "end $(date +%s)" >> "$runs"
exit 0
