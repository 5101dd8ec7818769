"""The ops of fusedecode, one module each, all on one template (``README.md`` in this folder).

``logit_stats``, ``verify_tree`` and ``linear_ce`` (``linear_cross_entropy_entropy``) each hold their
output table, their public function (whose docstring is the one statement of the op's math), the
steps from its arguments to its custom ops, and the registration of those custom ops. The public
functions are exported from ``fusedecode``; this package re-exports nothing, so that each module
stays reachable under its own name.
"""
