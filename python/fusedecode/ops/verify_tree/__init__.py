"""``fusedecode.verify_tree``, one op as one slice (the layout of ``ops/logit_stats/``):
``contract.py`` (output table, ``TreeVerification``, schemas), ``reference.py`` (the torch oracle),
``checks.py`` (argument checks), ``op.py`` (public function, dispatch, custom ops). This package
re-exports their names.
"""

from .checks import check_seed, check_verify_tree_args
from .contract import ARGUMENTS, BACKENDS, OUTPUTS, SCHEMA, SCHEMAS, STATS, WALK, TreeVerification
from .op import allocate_outputs, verify_tree
from .reference import verify_tree_reference

__all__ = ["verify_tree", "TreeVerification", "OUTPUTS", "STATS", "WALK", "allocate_outputs", "check_seed",
           "check_verify_tree_args", "verify_tree_reference", "ARGUMENTS", "BACKENDS", "SCHEMA", "SCHEMAS"]
