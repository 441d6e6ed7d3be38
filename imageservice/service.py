"""ImageService: thin RPC handlers that validate and delegate."""

from __future__ import annotations

from cri.config import Config


class ImageService:
    """Servicer for runtime.v1.ImageService (registered through cri.boundary)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    async def start(self) -> None:
        return None
