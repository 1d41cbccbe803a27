#!/bin/sh
# Rebuilds the quickstart's Wasm modules (modules/*.wasm) from their C sources (src/*.c).
# Needs Debian's clang, lld, wasi-libc and libclang-rt-14-dev-wasm32. The built modules are
# committed, so running the quickstart needs no toolchain.
set -eu
cd "$(dirname "$0")"
CFLAGS="--target=wasm32-wasi -O2 -Wl,--strip-all"
# Function tasks are reactors: no main, the proplet calls their exported function.
for name in primes fib; do
    clang $CFLAGS -mexec-model=reactor -o "modules/$name.wasm" "src/$name.c"
done
# WASI commands (main, argv, env, stdin).
for name in wordcount heartbeat; do
    clang $CFLAGS -o "modules/$name.wasm" "src/$name.c"
done
