"""Implementations of ``bridge.media.blobs.BlobStore``: a local folder (``local``), S3 (``s3``)."""
