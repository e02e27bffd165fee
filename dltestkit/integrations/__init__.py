"""Adapters that give other frameworks' training loops the shape the trainer checks test:
``lightning`` (PyTorch Lightning)."""
