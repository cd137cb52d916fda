# Shared preamble of the command-line tests (tests/cli_*.sh source it; the name keeps it out of
# CMake's cli_*.sh glob): $bin (the built programs), $work (a temp dir removed on exit, made
# writable first so tests may lock files in it), fail and expect_exit.
bin=${QLORA_BIN:?QLORA_BIN must name the directory of the built programs}
work=$(mktemp -d)
trap 'chmod -R u+w "$work" 2>/dev/null || true; rm -rf "$work"' EXIT
cli_name=$(basename "$0" .sh)

fail() {
    echo "$cli_name: FAIL: $*" >&2
    exit 1
}

# expect_exit CODE NEEDLE CMD...: CMD must exit with CODE and print NEEDLE on stderr.
expect_exit() {
    local code=$1 needle=$2 rc=0
    shift 2
    "$@" >"$work/out.txt" 2>"$work/err.txt" || rc=$?
    [ "$rc" -eq "$code" ] || fail "'$*' exited $rc, expected $code; stderr: $(cat "$work/err.txt")"
    grep -qF -- "$needle" "$work/err.txt" || fail "'$*': stderr lacks '$needle': $(cat "$work/err.txt")"
}
