"""Data: the RAER format (annotations, boxes, views), datasets with TSN sampling, loaders, and `caer synth`."""
