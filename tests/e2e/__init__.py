"""End-to-end tests: real QEMU migrations."""
