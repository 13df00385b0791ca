"""One module per CLI stage: `add_arguments(parser)` and `run(cfg)`."""
