"""Events: the bus that tells subscribers and waiting claims of every commit, per backend."""
