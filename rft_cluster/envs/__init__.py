"""Embedded environments: real tool servers, graders and datasets that run in-process, so a
job can train end to end with no external services (docs/architecture.md §5)."""
