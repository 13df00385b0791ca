"""One module per CLI stage: a config dataclass (one field per flag, its docstring the
help) and a function `stage(cfg, trainer=None)` of wiring; the science is in the library.
No stage imports another (docs/architecture.md)."""
