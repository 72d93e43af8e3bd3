"""The two ways rdzv-launch refuses to go on before anything runs: bad input, or a failed set-up."""


class UsageProblem(Exception):
    """Bad input: reported as one line with exit code 2, before anything is spawned."""


class LaunchFailed(Exception):
    """A failure that is not the user's input (e.g. the backend cannot be set up): one line, exit 1."""
