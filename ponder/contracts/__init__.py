"""The contracts between ponder's core and its plugins, built-in and third-party alike.

- :mod:`ponder.contracts.halting`: ``HaltingRule`` and ``HaltState`` (halting plugins).
- :mod:`ponder.contracts.norms`: the norm factory, ``ChannelsFirst``, and the capabilities ``FoldableNorm``,
  ``NeedsController``, ``KeepsInputScale`` and ``ScaledLearningRates`` that export, the trainer and the model look
  for (norm plugins).
- :mod:`ponder.contracts.controllers`: ``Controller``, ``TrainingEvent`` and the one ``dispatch`` (controller
  plugins). Torch-free.

Optimizer plugins need no class of ours: a factory ``factory(params, **settings) -> torch.optim.Optimizer`` with a
faithful ``state_dict()``; ``metrics() -> dict``, if defined, is logged by the trainer.

Plugins import from here (and ``ponder.errors``, ``ponder.registry.hookspecs``), never from the rest of ponder:
``make test`` checks it (``.importlinter``).
"""
