"""Errors of the search that stop a command before or instead of a study (the command prints them, exit 2)."""


class SearchError(Exception):
    """A study that cannot run: another driver holds it, the Ray cluster cannot measure, no study exists."""
