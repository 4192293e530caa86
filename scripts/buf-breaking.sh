#!/usr/bin/env bash
# Fail when protos/ breaks the contract of the previous commit (buf FILE rules).
# Compares against HEAD~1 when the working tree is clean (CI), else HEAD.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
buf=tools/node_modules/.bin/buf
if [ -n "$(git status --porcelain -- protos)" ]; then ref=HEAD; else ref=HEAD~1; fi
if ! git rev-parse -q --verify "$ref^{commit}" >/dev/null; then
  echo "buf breaking: no earlier commit to compare with"; exit 0
fi
if ! git cat-file -e "$ref:protos/buf.yaml" 2>/dev/null; then
  echo "buf breaking: $ref has no protos yet"; exit 0
fi
if [ "$(git rev-parse --is-shallow-repository)" = true ]; then
  git fetch -q --deepen=1 origin 2>/dev/null || true
fi
$buf breaking protos --against ".git#ref=$ref,subdir=protos"
echo "buf breaking: no breaking change against $ref"
