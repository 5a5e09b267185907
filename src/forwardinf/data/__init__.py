"""Data: input adapters and dataset loaders."""
