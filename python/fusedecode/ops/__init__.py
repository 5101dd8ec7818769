"""The ops of fusedecode, one package each, all on one template (``README.md`` in this folder).

``logit_stats``, ``verify_tree``, ``linear_ce`` (``linear_cross_entropy_entropy``) and
``linear_logit_stats`` are each a vertical slice: ``contract.py`` (the output table, result type and
custom-op schemas), ``reference.py`` (the torch oracle), ``checks.py`` (the argument checks),
``op.py`` (the public function, whose docstring is the one statement of the op's math, the steps
from its arguments to its custom ops, and their registration); each file imports only the ones
before it, and each op package re-exports its slice's names. The ops that compute a language-model
head's logits themselves (``linear_ce``, ``linear_logit_stats``) walk one tiled head,
``_tiled_head.py``; ``_outputs.py`` turns an output table into result types, schemas and
allocations. The public functions are exported from ``fusedecode``; this package re-exports
nothing, so that each op stays reachable under its own name.
"""
