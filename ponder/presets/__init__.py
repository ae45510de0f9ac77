"""Built-in run configs (``ponder train --preset NAME``), one TOML file each."""
