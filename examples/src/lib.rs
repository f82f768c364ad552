//! Runnable examples of Concord. The examples live under `examples/`.
