#!/bin/sh
# Rebuilds every test module from its source, next to it. Needs Debian's wabt, clang, lld,
# wasi-libc and libclang-rt-14-dev-wasm32. notwasm.wasm is deliberately not Wasm and is not built.
set -eu
cd "$(dirname "$0")"
for wat in *.wat; do
    wat2wasm -o "${wat%.wat}.wasm" "$wat"
done
for c in *.c; do
    clang --target=wasm32-wasi -O2 -Wl,--strip-all -o "${c%.c}.wasm" "$c"
done
