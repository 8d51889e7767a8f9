"""The repository as stored objects: config, keys and epochs, packs, the chunk index and
generation manifests, on top of any `Backend`. This layer knows the object formats and
their write order (docs/FORMAT.md section 9); it does not know about pipelines."""

from dedupe.store.blobs import BlobCodec
from dedupe.store.index import ChunkIndex, ChunkLocation
from dedupe.store.packer import FinishedPack, PackWriter
from dedupe.store.repository import RepositoryStore

__all__ = [
    "BlobCodec",
    "ChunkIndex",
    "ChunkLocation",
    "FinishedPack",
    "PackWriter",
    "RepositoryStore",
]
