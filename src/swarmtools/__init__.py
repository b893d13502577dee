"""Tools for tests and benchmarks of swarmcache (never needed on a hypervisor host)."""
