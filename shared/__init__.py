"""The thin utils package the launchkit scripts share: accelerator setup, schedules, EMA,
checkpoints, run outputs, plots and metrics. Nothing task-specific lives here."""
