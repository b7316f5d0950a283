"""Read-only analysis of the tasks and task_history tables with pandas."""
