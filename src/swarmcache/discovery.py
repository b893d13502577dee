"""mDNS / DNS-SD discovery: announce this daemon, find the others, feed the swarm.

Each daemon registers `<node id>._swarmcache._tcp.local.` with TXT properties
node (its id), port (its API port), v (protocol version) and gen (a counter that
moves whenever the set of chunks it holds changes; chunk lists never go into mDNS,
the peer API carries them). It browses for the same type; added and updated
services become peers, goodbyes and expired records remove them. Services with
another protocol version, or our own, are ignored.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Callable
from typing import Any

import ifaddr
from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from .errors import ConfigError
from .wire import PROTOCOL_VERSION

log = logging.getLogger(__name__)
SERVICE_TYPE = "_swarmcache._tcp.local."
GEN_UPDATE_EVERY = 5.0  # seconds between checks of the inventory for a TXT update
GEN_BLOCKS_EVERY = 60.0  # ... when only the blocks held moved (images held: at once)
RESOLVE_TIMEOUT_MS = 3000


def interface_addresses(interfaces: tuple[str, ...]) -> list[str]:
    """IPv4 addresses for `discovery.interfaces` (names or addresses; empty: all but lo)."""
    adapters = ifaddr.get_adapters()
    out: list[str] = []
    for entry in interfaces:
        try:
            ipaddress.ip_address(entry)
        except ValueError:
            pass
        else:
            out.append(entry)
            continue
        match = [a for a in adapters if a.nice_name == entry or a.name == entry]
        if not match:
            raise ConfigError("discovery.interfaces", "", f"no network interface {entry!r}")
        out += [str(ip.ip) for a in match for ip in a.ips if isinstance(ip.ip, str)]
    if not interfaces:
        out = [
            str(ip.ip)
            for a in adapters
            for ip in a.ips
            if isinstance(ip.ip, str) and not ipaddress.ip_address(ip.ip).is_loopback
        ]
    return out


class Discovery:
    """Registers this daemon over mDNS and reports peers found to `found` / `lost`."""

    def __init__(
        self,
        node_id: str,
        port: int,
        addresses: list[str],
        found: Callable[[str, str, int, int, tuple[int, int], bool], None],
        lost: Callable[[str], None],
        generation: Callable[[], int] = lambda: 0,
        inventory: Callable[[], tuple[int, int]] = lambda: (0, 0),
        role: str = "host",
    ) -> None:
        self.role = role
        self.node_id = node_id
        self.port = port
        self.addresses = addresses
        self.found = found
        self.lost = lost
        self.generation = generation
        self.inventory = inventory
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._names: dict[str, str] = {}  # service name -> node id
        self._tasks: set[asyncio.Task[None]] = set()
        self._gen = -1
        self._images = -1

    async def __aenter__(self) -> Discovery:
        self._zc = AsyncZeroconf(interfaces=self.addresses or None, ip_version=IPVersion.V4Only)  # type: ignore[arg-type]
        self._info = self._service_info()
        await self._zc.async_register_service(self._info)
        self._browser = AsyncServiceBrowser(
            self._zc.zeroconf, SERVICE_TYPE, handlers=[self._on_change]
        )
        self._spawn(self._generation_loop())
        log.info(
            "mDNS: announcing %s on %s port %d", self.node_id, ",".join(self.addresses), self.port
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._zc is not None:
            await self._zc.async_unregister_all_services()  # goodbye packets
            await self._zc.async_close()

    def _service_info(self) -> AsyncServiceInfo:
        self._gen = self.generation()
        images, chunks = self.inventory()
        self._images = images
        return AsyncServiceInfo(
            SERVICE_TYPE,
            f"{self.node_id}.{SERVICE_TYPE}",
            port=self.port,
            properties={
                "node": self.node_id,
                "port": str(self.port),
                "v": str(PROTOCOL_VERSION),
                "gen": str(self._gen),
                "images": str(images),
                "chunks": str(chunks),
                "role": self.role,
            },
            server=f"swarmcache-{self.node_id}.local.",
            addresses=[socket.inet_aton(a) for a in self.addresses],
        )

    async def _generation_loop(self) -> None:
        """Re-announce when the images held changed (checked every few seconds), or
        when only the counter moved, once a minute: every host hears every update,
        and during a fetch the counter moves with every block (measured: 32 daemons
        re-announcing every 5 s spent about 7% of their event loop on mDNS)."""
        loop = asyncio.get_running_loop()
        announced = loop.time()
        while True:
            await asyncio.sleep(GEN_UPDATE_EVERY)
            if self.generation() == self._gen or self._zc is None:
                continue
            images = self.inventory()[0]
            if images == self._images and loop.time() - announced < GEN_BLOCKS_EVERY:
                continue
            self._info = self._service_info()
            await self._zc.async_update_service(self._info)
            announced = loop.time()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        if state_change is ServiceStateChange.Removed:
            node = self._names.pop(name, None)
            if node is not None:
                self.lost(node)
            return
        self._spawn(self._resolve(name))

    async def _resolve(self, name: str) -> None:
        if self._zc is None:
            return
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(self._zc.zeroconf, RESOLVE_TIMEOUT_MS):
            log.debug("mDNS: %s did not resolve", name)
            return
        props = {
            k.decode(errors="replace"): (v or b"").decode(errors="replace")
            for k, v in info.properties.items()
        }
        node = props.get("node", "")
        if node == self.node_id or not node:
            return
        if props.get("v") != str(PROTOCOL_VERSION):
            log.info("mDNS: ignoring %s: protocol version %r", name, props.get("v"))
            return
        addresses = info.parsed_addresses(IPVersion.V4Only)
        if not addresses or not info.port:
            return
        try:
            gen = int(props.get("gen", "0"))
            inventory = (int(props.get("images", "0")), int(props.get("chunks", "0")))
        except ValueError:
            gen, inventory = 0, (0, 0)
        self._names[name] = node
        self.found(node, addresses[0], info.port, gen, inventory, props.get("role") == "seeder")
