from typing_extensions import Buffer

IMPLEMENTATIONS: dict[str, int]
BEST: str

def available() -> list[str]: ...
def keyed_many(key: bytes, chunks: list[Buffer], implementation: str = "best") -> list[bytes]: ...
