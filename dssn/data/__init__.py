"""Data: the shard format, dataset preparation, augmentations and the Ray Data pipeline.

- ``dssn.data.format``   — Parquet shard schema, atomic writer, dataset.json, encode/decode.
- ``dssn.data.prepare``  — ``dssn prepare voc|cityscapes|folder``: verified, parallel, idempotent.
- ``dssn.data.digits``   — the built-in synthetic digit-scenes dataset.
- ``dssn.data.augment``  — DSSN augmentations on uint8 tensors (geometric, strong, CutMix).
- ``dssn.data.pipeline`` — Ray Data streams for Ray Train workers, validation reader.

Submodules are imported explicitly (``from dssn.data import format``) so that importing the
package stays cheap.
"""
