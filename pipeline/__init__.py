"""Ray-free pipeline stages. Imports go one way: ``storage`` <- ``ingest`` <- ``loader`` <- ``curation``.

- ``storage``: fsspec URLs, atomic writes, credentials; ``checks``: the shared argument checks.
- ``ingest``: raw videos to shards: ``sources`` (listing), ``probe``, ``transcode`` (+ ``scenes`` cuts),
  ``encode`` (H.264), ``shards`` (WebDataset tars), ``manifest`` (index + manifest, written last).
- ``loader``: shards to training batches: ``decode``, ``clips`` (frames -> clips), ``transforms``, ``masking`` and
  ``decoder_masking``, ``normalize`` (ImageNet statistics; no torchvision, so ``model/`` may import it),
  ``views`` (eval views), ``config`` (``LoaderConfig``), ``plan`` (who reads which sample when; the cursor), ``stream``
  (the decode workers), ``loader`` (``ClipLoader``, ``make_loader``).
- ``curation``: ``quality`` (per-clip metrics), ``semantic`` (embedding dedup/clusters), ``subset`` (rules ->
  manifests), ``synth`` (the synthetic labelled set).
"""
