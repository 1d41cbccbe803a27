"""The board agent's portable C core built for the host, and a board emulator that drives it.

``library`` binds ``libpropeller_board.so`` (``make -C zephyr host``), ``wasm`` runs modules on
wasmtime under a board's limits, and ``emulator`` connects boards to a real broker.
"""
