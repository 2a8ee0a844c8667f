"""Ingest: raw videos -> probed, transcoded WebDataset shards with an index and a manifest written last."""
