"""Origins: where image bytes come from when no nearer copy exists.

The interface and the retries every kind shares live in base.py; http.py,
glance.py (an HTTP origin that speaks Glance's v2 API) and directory.py are the
kinds. Imports run one way: this package's entry point picks a kind, the kinds
import the interface, the interface imports neither.
"""

from __future__ import annotations

from ..config import OriginConfig
from .base import (
    MAX_SIDECAR_BYTES,
    Origin,
    OriginImage,
    Sink,
    backoff_delay,
    parse_sha256_sidecar,
)
from .directory import DirectoryOrigin
from .glance import GlanceOrigin
from .http import HttpOrigin

__all__ = [
    "MAX_SIDECAR_BYTES",
    "Origin",
    "OriginImage",
    "Sink",
    "backoff_delay",
    "make_origin",
    "parse_sha256_sidecar",
]


def make_origin(config: OriginConfig) -> Origin:
    """The origin the config asks for."""
    if config.kind == "http":
        return HttpOrigin(config)
    if config.kind == "glance":
        return GlanceOrigin(config)
    return DirectoryOrigin(config)
