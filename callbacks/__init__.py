"""Lightning Callbacks: what observes a fit without being the model (training
heatmaps of Q2B, the world-quality monitor). Stages attach them."""
