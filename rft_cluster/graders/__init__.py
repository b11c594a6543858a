"""Grader implementations, one module per grader kind. `rft_cluster.grader_actor` builds them from
the config and wraps them in the `GraderActor`.
"""
