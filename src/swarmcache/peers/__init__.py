"""Peers: the table of other daemons and the swarm that talks to them."""
