"""The demo of fusedecode and what it runs on, kept out of the library modules.

- ``arithmetic``: the synthetic task of the bundled models (written-out multi-digit addition) and its
  character-level tokenizer.
- ``train_bundled``: trains the bundled target and draft models (``make train-bundled``; the library
  finds them with ``fusedecode.hf.bundled_model_path``).
- ``demo``: ``python -m fusedecode demo`` (``make demo``): uncertainty, Best-of-N, DeepConf, SRGen and
  tree speculation on the bundled models.
"""
