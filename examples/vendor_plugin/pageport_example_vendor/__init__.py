"""Example vendor platform for pageport."""
