"""`python -m swarmcache` is the `swarmcache` command."""

from .cli import main

main()
