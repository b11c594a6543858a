"""Grader implementations, one module per grader kind. `rft_cluster.grader` builds them from
the config and wraps them in the `GraderActor`.

This package imports nothing at its top level, so `rft_cluster.config` can import
`rft_cluster.graders.formula` (to check a multi grader's formula at load time) without a cycle.
"""
