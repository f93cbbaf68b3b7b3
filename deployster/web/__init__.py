"""The HTTP edge: aiohttp routes per resource, auth, the error envelope, limits, SSE."""
