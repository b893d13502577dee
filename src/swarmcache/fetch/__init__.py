"""Fetching images into the store: the fetcher (one job per image) and the parts of a job.

Imports run one way: fetcher -> job -> origin_reads, peer_reads -> landing -> common.
"""

from .fetcher import MAX_FAILURES, Failure, Fetcher
from .job import FetchJob

__all__ = ["MAX_FAILURES", "Failure", "FetchJob", "Fetcher"]
