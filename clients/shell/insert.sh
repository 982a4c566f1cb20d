#!/bin/sh
# insert.sh TABLE ROW-JSON... — inserts rows with the structured op (Datasette's insert) and prints
# {"inserted":N}. The table must exist; ALTER=1 adds the columns it lacks.
#
#   ./insert.sh dogs '{"name": "Rex"}' '{"name": "Cleo", "age": 3}'
set -eu
[ $# -ge 2 ] || { echo "usage: insert.sh TABLE ROW-JSON..." >&2; exit 2; }
table=$1; shift
args=$(jq -cn --arg table "$table" --argjson alter "$([ -n "${ALTER:-}" ] && echo true || echo false)" \
    '{table: $table, rows: [$ARGS.positional[] | fromjson], alter: $alter}' --args "$@")
exec "$(dirname "$0")/request.sh" insert "$args"
