"""`rdzv-launch --health-check`: the gate run before a join where the check is due (`gate`:
the first join and the one after this node's own failure, or every join) and the built-in GPU
check it runs for `builtin:gpu` (`gpu`, a process of its own: `python -m launcher.health.gpu`)."""
