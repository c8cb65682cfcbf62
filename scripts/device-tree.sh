#!/usr/bin/env bash
# The device tool sends the checkout's tracked files (and untracked ones git does not ignore) with
# every call, 64 MiB at most with what it carries. The test fixtures alone are about 70 MB
# (tests/fixtures/parity/inception_fid_random_weights.safetensors is 48 MB), and no device check
# reads them. So, around the device calls:
#   scripts/device-tree.sh slim      untrack tests/fixtures for now (the files stay on disk, ignored)
#   ...device calls...
#   scripts/device-tree.sh restore   track them again, exactly as before
# `slim` refuses while changes are staged, so that `restore` gives back the index it found; never
# commit between the two (git status shows the fixtures as deleted while slim).
set -euo pipefail
cd "$(dirname "$0")/.."
EXCLUDE=$(git rev-parse --git-path info/exclude)
# two lines in the exclude file: this comment, then the pattern
MARK="# scripts/device-tree.sh slim (restore removes these two lines)"
PATTERN="/tests/fixtures/"
size() { git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1; }
case "${1:-}" in
  slim)
    if grep -qxF "$MARK" "$EXCLUDE" 2>/dev/null; then
      echo "already slim; scripts/device-tree.sh restore puts the fixtures back" >&2
      exit 1
    fi
    if ! git diff --cached --quiet; then
      echo "changes are staged: commit or unstage them first, so that restore gives back this index" >&2
      exit 1
    fi
    git rm -r -q --cached tests/fixtures
    mkdir -p "$(dirname "$EXCLUDE")"
    printf '%s\n%s\n' "$MARK" "$PATTERN" >> "$EXCLUDE"
    echo "tracked files now: $(( $(size) / 1048576 )) MiB; run scripts/device-tree.sh restore after the device calls" >&2
    ;;
  restore)
    git reset -q -- tests/fixtures
    if [ -f "$EXCLUDE" ]; then
      grep -vxF -e "$MARK" -e "$PATTERN" "$EXCLUDE" > "$EXCLUDE.tmp" || true
      mv "$EXCLUDE.tmp" "$EXCLUDE"
    fi
    echo "tracked files: $(( $(size) / 1048576 )) MiB" >&2
    ;;
  *)
    echo "usage: scripts/device-tree.sh slim|restore" >&2
    exit 2
    ;;
esac
