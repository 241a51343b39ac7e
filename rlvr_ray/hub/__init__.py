"""Hub checkpoints and the watch: ``hf://org/name[@revision]`` refs (read by byte range, or
downloaded whole when asked: :mod:`rlvr_ray.hub.source`), discovery of new fine-tunes and the
standing scan of them (:mod:`rlvr_ray.hub.watch`).

Importing this package is cheap: huggingface_hub is imported only when a ref is opened.
"""
