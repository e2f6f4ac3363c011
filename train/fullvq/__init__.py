"""fullvq: the PyTorch training library (models, quantizers, losses, data, metrics, checkpoints)."""
