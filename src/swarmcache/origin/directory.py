"""Directory origin: images are files in a folder, `<path>/<image_id>` (+ `.sha256`)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from ..errors import OriginChanged, OriginError, OriginInvalid, OriginNotFound
from ..manifest import Checksum, validate_image_id
from .base import Origin, OriginImage, Sink, parse_sha256_sidecar


class DirectoryOrigin(Origin):
    """Reads images from a local (or network-mounted) directory."""

    def _file(self, image_id: str) -> Path:
        return self.config.path / validate_image_id(image_id)

    def describe(self, image_id: str) -> str:
        """The image's path."""
        return str(self._file(image_id))

    async def _stat(self, image_id: str) -> OriginImage:
        return await asyncio.to_thread(self._stat_sync, image_id)

    def _stat_sync(self, image_id: str) -> OriginImage:
        path = self._file(image_id)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise OriginNotFound(f"no image {image_id!r} at origin ({path})") from None
        except OSError as err:
            raise OriginError(f"cannot stat {path}: {err.strerror}") from err
        if not path.is_file():
            raise OriginNotFound(f"{path} is not a regular file")
        sha256 = None
        sidecar = path.with_name(path.name + ".sha256")
        if self.config.checksum_sidecar and sidecar.exists():
            try:
                sha256 = parse_sha256_sidecar(sidecar.read_bytes())
            except (OSError, ValueError) as err:
                raise OriginInvalid(f"checksum sidecar {sidecar} is unusable: {err}") from err
        checksum = Checksum("sha256", sha256) if sha256 is not None else None
        return OriginImage(size=st.st_size, validator=_validator(st), checksum=checksum)

    async def _read(
        self,
        image_id: str,
        offset: int,
        length: int,
        validator: str,
        size: int | None,
        sink: Sink | None,
    ) -> list[bytes]:
        # validator (mtime and size) already pins the size
        pieces = await asyncio.to_thread(self._read_sync, image_id, offset, length, validator)
        if sink is not None:
            for piece in pieces:
                sink.feed(piece)
        return pieces

    def _read_sync(self, image_id: str, offset: int, length: int, validator: str) -> list[bytes]:
        path = self._file(image_id)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise OriginNotFound(f"image {image_id!r} vanished from the origin ({path})") from None
        except OSError as err:
            raise OriginError(f"cannot open {path}: {err.strerror}") from err
        try:
            if validator and validator != _validator(os.fstat(fd)):
                raise OriginChanged(f"{path}: the image changed at the origin during the fetch")
            parts = []
            got = 0
            while got < length:
                part = os.pread(fd, length - got, offset + got)
                if not part:
                    break
                parts.append(part)
                got += len(part)
            return parts
        except OSError as err:
            raise OriginError(f"cannot read {path}: {err.strerror}") from err
        finally:
            os.close(fd)


def _validator(st: os.stat_result) -> str:
    """What identifies one version of a file: mtime and size."""
    return f"{st.st_mtime_ns:x}-{st.st_size:x}"
