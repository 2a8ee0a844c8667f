"""Curation: per-clip quality and semantic metadata, subset rules as manifests, and the synthetic set."""
