"""What observes without being the model: image grids, plots, metric loggers."""
