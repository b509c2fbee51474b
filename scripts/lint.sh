#!/bin/sh
# Static checks run by `make test`: banned functions and formatting.
set -e
cd "$(dirname "$0")/.."
status=0
files=$(git ls-files 'src/*.c' 'src/*.h' 'tests/unit/*.c' 'tests/fuzz/*.c' 'bench/*.c' 'bench/*.h' 2>/dev/null || true)
[ -n "$files" ] || files=$(find src tests bench -name '*.[ch]')
# strcpy/strcat/sprintf/strtok/atoi: unbounded or error-blind; use the bounded forms.
banned=$(grep -nE '(^|[^_a-zA-Z0-9])(strcpy|strcat|sprintf|vsprintf|strtok|atoi|gets)[[:space:]]*\(' $files || true)
if [ -n "$banned" ]; then
    echo "lint: banned functions:"
    echo "$banned"
    status=1
fi
if command -v clang-format >/dev/null 2>&1; then
    bad=""
    for f in $files; do
        if ! clang-format --dry-run -Werror "$f" >/dev/null 2>&1; then
            bad="$bad $f"
        fi
    done
    if [ -n "$bad" ]; then
        echo "lint: not clang-formatted (run 'make format'):$bad"
        status=1
    fi
fi
[ $status -eq 0 ] && echo "lint: ok"
exit $status
