"""Memory: bytes only. The canonical per-expert layout, pinned host buffers, the host store (every expert),
the device slot pool, and the copy engines that move one expert from one to the other. Nothing here decides
what to copy or evict: the cache does (``cache_policies``)."""
