"""The embedded world: its models, their training and saving, the judge of
shape and colour, and the richness series."""
