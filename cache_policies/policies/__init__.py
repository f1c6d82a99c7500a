"""The eviction policies, one per file; each only chooses victims (see :mod:`cache_policies.policy`)."""
