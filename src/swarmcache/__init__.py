"""swarmcache: a peer-to-peer VM image cache daemon for hypervisor hosts."""

__version__ = "0.1.0"
