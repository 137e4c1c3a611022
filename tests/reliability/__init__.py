"""Reliability: bad inputs, faults and interruptions through the public entry points (issue 13)."""
