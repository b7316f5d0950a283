"""The `taskorch` command: serve, migrate, keys, backup, work, demo and the rest."""
