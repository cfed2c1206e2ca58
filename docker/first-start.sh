# shellcheck shell=bash
# Sourced by the entry points. On a first start (the fixture not in the cache volume yet),
# first_start_begin PORT [--draft] logs what is about to be trained and about how long it takes, and
# answers /readyz on PORT with 503 and the same text (docker/first_start.py) until first_start_end,
# which the entry point calls before the service itself binds PORT. Both do nothing when it is cached.

first_start_py="$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/first_start.py"
first_start_pid=

first_start_begin() {
    local port=$1 message
    shift
    message=$(python3 "$first_start_py" plan "$@")
    [ -n "$message" ] || return 0
    echo "$message"
    python3 "$first_start_py" serve "$port" "$message" &
    first_start_pid=$!
    trap first_start_end EXIT  # a failed build must not leave the stand-in answering
}

first_start_end() {
    [ -n "$first_start_pid" ] || return 0
    kill "$first_start_pid" 2>/dev/null || true
    wait "$first_start_pid" 2>/dev/null || true
    first_start_pid=
}
