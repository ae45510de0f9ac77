"""Built-in plugins, one folder per kind (``norm``, ``optim``; ``control`` and ``halt`` follow).

Each folder's ``__init__`` is a plugin module with ``@hookimpl`` functions, loaded by name
through the same path as third-party plugins. Factories are registered by lazy
``"module:attribute"`` paths so that listing plugins never imports torch.
"""
