"""Scheduling: the node table, the edge registry that feeds it, and (next) the scheduler actor."""
