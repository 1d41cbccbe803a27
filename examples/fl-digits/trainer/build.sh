#!/bin/sh
# Rebuilds ../trainer.wasm, the fl-digits trainer (a WASI command), from trainer.c and npy.c.
# Needs Debian's clang, lld, wasi-libc and libclang-rt-14-dev-wasm32. The built module is
# committed, so running the example needs no toolchain.
set -eu
cd "$(dirname "$0")"
clang --target=wasm32-wasi -O2 -Wall -Wextra -Werror -Wl,--strip-all \
    -o ../trainer.wasm trainer.c npy.c -lm
echo "trainer.wasm: $(wc -c < ../trainer.wasm) bytes"
