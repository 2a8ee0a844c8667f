"""Data jobs on Ray: synthetic sets, sharding, curation metrics, embeddings and subset manifests."""
