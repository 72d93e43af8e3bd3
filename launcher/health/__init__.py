"""`rdzv-launch --health-check`: the gate run before every join (`gate`) and the built-in GPU
check it runs for `builtin:gpu` (`gpu`, a process of its own: `python -m launcher.health.gpu`)."""
