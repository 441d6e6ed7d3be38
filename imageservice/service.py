"""ImageService: thin RPC handlers that validate and delegate to the image manager."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from api import api_pb2
from cri.config import Config, ImageConfig
from cri.errors import DeadlineExceeded, InvalidArgument
from imageservice.auth import credentials_from_auth_config
from imageservice.images import ImageManager, InUse
from imageservice.index import ImageRecord

log = logging.getLogger(__name__)

STREAM_BATCH = 100  # images per StreamImagesResponse

ContainerFilesystems = Callable[[], Awaitable[list[api_pb2.FilesystemUsage]]]


def to_cri_image(record: ImageRecord, pinned: bool = False) -> api_pb2.Image:
    """The CRI Image for ``record``; ``pinned`` (from image.pinned_images) or the record's own."""
    image = api_pb2.Image(
        id=record.id,
        repo_tags=record.repo_tags,
        repo_digests=record.repo_digests,
        size=record.size,
        username=record.username,
        spec=api_pb2.ImageSpec(image=record.id),
        pinned=record.pinned or pinned,
    )
    if record.uid is not None:
        image.uid.value = record.uid
    return image


def verbose_info(record: ImageRecord) -> dict[str, str]:
    """ImageStatus's verbose info, shaped like containerd's (``chainID``, ``imageSpec``)."""
    info: dict[str, Any] = {
        "chainID": record.chain_ids[-1] if record.chain_ids else "",
        "imageSpec": record.config,
        "manifestDigest": record.manifest_digest,
    }
    return {"info": json.dumps(info, sort_keys=True)}


def _image_of(spec: api_pb2.ImageSpec, what: str) -> str:
    name = spec.image.strip()
    if not name:
        raise InvalidArgument(f"{what}: image.image must name an image")
    return name


class ImageService:
    """Servicer for runtime.v1.ImageService (registered through cri.boundary)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.manager = ImageManager(cfg)
        self._container_filesystems: ContainerFilesystems | None = None

    async def start(self) -> None:
        await self.manager.start()

    async def reload(self, image: ImageConfig | None = None) -> bool:
        """SIGHUP: apply a new [image] table (default: re-read the current one's files).

        False when it was refused (unreadable files) and the previous one kept.
        """
        return await self.manager.reload(image)

    def close(self) -> None:
        self.manager.close()

    # --- seams for the container layer -----------------------------------------

    def set_in_use(self, fn: InUse | None) -> None:
        """``fn(image_id)`` says whether a container uses the image (RemoveImage refuses)."""
        self.manager.set_in_use(fn)

    def set_container_filesystems(self, fn: ContainerFilesystems | None) -> None:
        """Where ImageFsInfo gets ``container_filesystems`` (the writable layers)."""
        self._container_filesystems = fn

    def _image(self, record: ImageRecord) -> api_pb2.Image:
        return to_cri_image(record, self.manager.is_pinned(record))

    # --- RPCs -----------------------------------------------------------------

    async def PullImage(self, request: api_pb2.PullImageRequest,
                        context: grpc.aio.ServicerContext) -> api_pb2.PullImageResponse:
        name = _image_of(request.image, "PullImage")
        credentials = credentials_from_auth_config(request.auth) if request.HasField("auth") \
            else None
        remaining = context.time_remaining()
        try:
            if remaining is None:
                result = await self.manager.pull(name, credentials)
            else:
                async with asyncio.timeout(remaining):
                    result = await self.manager.pull(name, credentials)
        except TimeoutError:
            raise DeadlineExceeded(f"pulling {name}: the client's deadline passed") from None
        return api_pb2.PullImageResponse(image_ref=result.image_id)

    async def ImageStatus(self, request: api_pb2.ImageStatusRequest,
                          context: grpc.aio.ServicerContext) -> api_pb2.ImageStatusResponse:
        record = self.manager.find(request.image.image.strip())
        if record is None:
            return api_pb2.ImageStatusResponse()
        info = verbose_info(record) if request.verbose else {}
        return api_pb2.ImageStatusResponse(image=self._image(record), info=info)

    async def ListImages(self, request: api_pb2.ListImagesRequest,
                         context: grpc.aio.ServicerContext) -> api_pb2.ListImagesResponse:
        records = self.manager.list_images(request.filter.image.image.strip())
        return api_pb2.ListImagesResponse(images=[self._image(r) for r in records])

    async def StreamImages(self, request: api_pb2.StreamImagesRequest,
                           context: grpc.aio.ServicerContext
                           ) -> AsyncIterator[api_pb2.StreamImagesResponse]:
        records = self.manager.list_images(request.filter.image.image.strip())
        for start in range(0, len(records), STREAM_BATCH):
            batch = records[start:start + STREAM_BATCH]
            yield api_pb2.StreamImagesResponse(images=[self._image(r) for r in batch])

    async def RemoveImage(self, request: api_pb2.RemoveImageRequest,
                          context: grpc.aio.ServicerContext) -> api_pb2.RemoveImageResponse:
        await self.manager.remove(_image_of(request.image, "RemoveImage"))
        return api_pb2.RemoveImageResponse()

    async def ImageFsInfo(self, request: api_pb2.ImageFsInfoRequest,
                          context: grpc.aio.ServicerContext) -> api_pb2.ImageFsInfoResponse:
        used, inodes = await self.manager.usage()
        images = api_pb2.FilesystemUsage(
            timestamp=time.time_ns(),
            fs_id=api_pb2.FilesystemIdentifier(mountpoint=str(self.manager.root)),
            used_bytes=api_pb2.UInt64Value(value=used),
            inodes_used=api_pb2.UInt64Value(value=inodes),
        )
        containers = await self._container_filesystems() if self._container_filesystems else []
        return api_pb2.ImageFsInfoResponse(image_filesystems=[images],
                                           container_filesystems=containers)
