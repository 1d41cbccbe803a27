"""The proplet worker agent: MQTT session, convergence to its desired set, Wasm on wasmtime."""

__version__ = "0.1.0"
