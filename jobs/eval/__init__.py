"""Evaluation: multi-view top-k, kNN and linear probe on frozen features, export and model info."""
