"""The model side: the open_clip backbone, the CAER model (and what each stage trains), losses, metrics, checkpoints."""
