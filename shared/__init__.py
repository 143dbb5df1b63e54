"""The thin utils package the launchkit training scripts share: accelerator and batch plan, recipe flags, leaf helpers
for the loop, pickle-free checkpoints and the run folder, decode caches, results rows, plots. Nothing task-specific."""
