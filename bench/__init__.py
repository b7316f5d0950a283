"""The benchmark suite: real servers on fresh databases, driven over loopback by a separate process."""
