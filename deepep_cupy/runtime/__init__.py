"""Process-level runtime: the NVSHMEM library lifecycle (see nvshmem.py)."""
