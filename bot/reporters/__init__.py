"""Reporting back to the forges: commit statuses (and, later, check runs) for every build."""
