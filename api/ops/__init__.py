"""Operations: health, metrics, logs, backup and restore, retention and graceful shutdown."""
