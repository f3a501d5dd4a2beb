"""fowlflow.data: where the images come from and how they become model pixels; no torch.

    from fowlflow.data.sources import resolve_data
    source = resolve_data("https://host/fowl_data.zip")    # DataSource(root, uri, kind, name)
    layout = scan_imagefolder(source.root)                 # fowlflow.data.imagefolder

Modules: ``sources`` (the ``data`` parameter → a local ImageFolder, the one parser of data
URIs), ``downloads`` (http(s) into the cache), ``s3``, ``archives`` (safe unpacking of a
``.zip``), ``synthetic`` (a generated two-class set), ``imagefolder`` (layout scan and check),
``images`` (decode + the preprocessing the trainer's validation images and the served model
share), ``pack`` and ``shards`` (``fowlflow data pack``: an ImageFolder as WebDataset shards,
and reading them back per rank; ``commands`` registers the CLI). The trainer and the registry
import this package; it imports neither of them, nor torch at import time: ``images`` is
shipped inside every ONNX model, and ``pack``/``shards`` load webdataset (which imports torch)
only inside their functions.
"""
