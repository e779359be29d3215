"""Reliability: bad input gets one clear line, crashes and restarts lose nothing (docs/reliability.md)."""
