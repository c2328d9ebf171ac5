"""The sans-IO core: bytes in, events and buffers out; no asyncio, sockets or clocks."""

from __future__ import annotations
