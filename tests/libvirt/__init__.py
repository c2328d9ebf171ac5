"""Tests with two real libvirt daemons, each in a mount namespace of its own (issue 16)."""
