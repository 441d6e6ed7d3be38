"""What the container layer needs from the image store, and the adapter to it.

`ImageSource` is the seam: find an image by whatever the kubelet put in
`ContainerConfig.image` (an id, a digest or a name; lookups are in memory),
and the unpacked layer directories an overlay rootfs stacks. Tests can give
a source of their own; the daemon uses `ImageManagerSource`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from imageservice.images import ImageManager


@dataclass(frozen=True)
class ContainerImage:
    id: str  # the config digest ("sha256:…")
    config: Mapping[str, Any]  # the OCI image config blob
    chain_ids: tuple[str, ...]  # bottom-most first
    repo_digests: tuple[str, ...] = ()
    repo_tags: tuple[str, ...] = ()
    layer_dirs: tuple[Path, ...] = field(default=(), compare=False)  # for sources without a store

    @property
    def ref(self) -> str:
        """What ContainerStatus.image_ref reports: a repo digest, else the id."""
        return self.repo_digests[0] if self.repo_digests else self.id


class ImageSource(Protocol):
    def find(self, query: str) -> ContainerImage | None: ...

    def lowerdirs(self, image: ContainerImage) -> list[Path]:
        """The layers' directories, top-most first (NotFound when one is missing)."""
        ...


class ImageManagerSource:
    """`ImageSource` over the image service's `ImageManager`."""

    def __init__(self, manager: ImageManager) -> None:
        self.manager = manager

    def find(self, query: str) -> ContainerImage | None:
        rec = self.manager.find(query)
        if rec is None:
            return None
        return ContainerImage(
            id=rec.id, config=rec.config, chain_ids=tuple(rec.chain_ids),
            repo_digests=tuple(rec.repo_digests), repo_tags=tuple(rec.repo_tags))

    def lowerdirs(self, image: ContainerImage) -> list[Path]:
        return self.manager.stores.layers.lowerdirs(image.chain_ids)


class StaticImages:
    """`ImageSource` over a fixed set of images whose layers are plain directories."""

    def __init__(self, images: Mapping[str, ContainerImage]) -> None:
        self.images = dict(images)

    def find(self, query: str) -> ContainerImage | None:
        found = self.images.get(query)
        if found is None:
            found = next((i for i in self.images.values() if i.id == query), None)
        return found

    def lowerdirs(self, image: ContainerImage) -> list[Path]:
        return list(image.layer_dirs)
