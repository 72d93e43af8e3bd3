"""What the installed torch's elastic agent takes, asked once, and what rdzv-launch does where
an older release lacks something (torch 2.9 .. 2.15; docs/launcher.md lists the differences).

* `WorkerSpec` fields and `LocalElasticAgent` arguments a release lacks are not passed: the
  signatures are read once (`features`).
* `--shutdown-timeout` (torch's agent takes it from 2.12) and `--signals-to-handle` (read by
  torch from 2.10) are honoured on every release by `CompatAgent`.
* `--exit-barrier-timeout`: every supported release's `LocalElasticAgent` takes
  `exit_barrier_timeout` (default 300 s); `CompatAgent` passes it by name where the signature
  has it and sets the attribute torch's agent keeps it in otherwise, so our exit barrier
  (launcher.exit_barrier) and torch's log line read the same value.
* `--virtual-local-rank` and `--duplicate-std{out,err}-filters` (torch 2.10) cannot be honoured
  by an older torch: `unhonoured_options` says so, one line per option.
"""

from __future__ import annotations

import dataclasses
import inspect
import signal
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from torch.distributed.elastic.agent.server.api import DEFAULT_ROLE, WorkerGroup, WorkerSpec
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

from launcher.settings import LaunchSettings, Notice
from rdzv.torch_support import installed_version, release_of

# The signals torch's agent handles when it does not read TORCHELASTIC_SIGNALS_TO_HANDLE (< 2.10).
FIXED_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")
# WorkerSpec fields an option needs -> the release that added them (for the message).
SPEC_FIELDS_SINCE = {
    "duplicate_stdout_filters": "2.10",
    "duplicate_stderr_filters": "2.10",
    "virtual_local_rank": "2.10",
    "numa_options": "2.9",
}


@dataclass(frozen=True)
class Features:
    """What this torch's agent offers."""

    version: str
    spec_fields: frozenset[str]  # WorkerSpec's fields
    agent_shutdown_timeout: bool  # LocalElasticAgent(shutdown_timeout=...) (2.12+)
    signals_from_env: bool  # torch reads TORCHELASTIC_SIGNALS_TO_HANDLE (2.10+)
    agent_exit_barrier_timeout: bool = True  # LocalElasticAgent(exit_barrier_timeout=...) (2.9-2.15 all take it)


@lru_cache(maxsize=1)
def features() -> Features:
    version = installed_version() or "?"
    release = release_of(version) or (0, 0)
    agent_args = inspect.signature(LocalElasticAgent.__init__).parameters
    return Features(
        version=version,
        spec_fields=frozenset(f.name for f in dataclasses.fields(WorkerSpec)),
        agent_shutdown_timeout="shutdown_timeout" in agent_args,
        signals_from_env=release >= (2, 10),
        agent_exit_barrier_timeout="exit_barrier_timeout" in agent_args,
    )


def worker_spec(f: Features, **fields: Any) -> WorkerSpec:
    """torch's WorkerSpec from the fields this release has; the others must be unset (None,
    False), as `unhonoured_options` reported."""
    return WorkerSpec(**{k: v for k, v in fields.items() if k in f.spec_fields})


def unhonoured_options(s: LaunchSettings, f: Features) -> list[Notice]:
    """One warning per option given that this torch cannot honour."""
    notices = []
    wanted = {
        "--virtual-local-rank": ("virtual_local_rank", s.virtual_local_rank, "workers get LOCAL_RANK 0..N-1 and see every GPU"),
        "--duplicate-stdout-filters": ("duplicate_stdout_filters", s.duplicate_stdout_filters, "no filtered copy is written"),
        "--duplicate-stderr-filters": ("duplicate_stderr_filters", s.duplicate_stderr_filters, "no filtered copy is written"),
    }
    for option, (name, value, effect) in wanted.items():
        if value and name not in f.spec_fields:
            notices.append(
                Notice(
                    "option_unsupported",
                    f"{option} needs torch {SPEC_FIELDS_SINCE[name]} or later (this is torch {f.version}); ignored: {effect}",
                    "warning",
                    {"option": option, "torch": f.version},
                )
            )
    return notices


class CompatAgent(LocalElasticAgent):
    """torch's LocalElasticAgent, taking `shutdown_timeout`, `signals_to_handle` and
    `exit_barrier_timeout` on every release: passed to torch where it takes them, honoured here
    where it does not."""

    def __init__(
        self,
        *args: Any,
        shutdown_timeout: int,
        signals_to_handle: str,
        exit_barrier_timeout: float = 300.0,
        **kwargs: Any,
    ) -> None:
        f = features()
        if f.agent_shutdown_timeout:
            kwargs["shutdown_timeout"] = shutdown_timeout
        if f.agent_exit_barrier_timeout:
            kwargs["exit_barrier_timeout"] = exit_barrier_timeout
        super().__init__(*args, **kwargs)
        # torch's agent keeps it here (SimpleElasticAgent, 2.9-2.15); our barrier reads it from
        # here too, so a release without the argument would still wait as the option says.
        self._exit_barrier_timeout = exit_barrier_timeout
        # torch < 2.12 stops the workers with a fixed 30 s between SIGTERM and SIGKILL.
        self._own_shutdown_timeout = None if f.agent_shutdown_timeout else shutdown_timeout
        self._run_over = False
        wanted = tuple(name.strip() for name in signals_to_handle.split(",") if name.strip())
        # torch < 2.10 handles FIXED_SIGNALS whatever TORCHELASTIC_SIGNALS_TO_HANDLE says.
        self._own_signals = None if f.signals_from_env or set(wanted) == set(FIXED_SIGNALS) else wanted

    def _invoke_run(self, role: str = DEFAULT_ROLE) -> Any:
        try:
            return super()._invoke_run(role)
        finally:
            # The next _shutdown is torch's final one (not a restart's).
            self._run_over = True

    def _shutdown(self, *args: Any, **kwargs: Any) -> None:
        pcontext = self._pcontext
        if self._own_shutdown_timeout is not None and self._run_over and pcontext is not None:
            # torch closes them again after this: a no-op once they are gone.
            death_sig = args[0] if args else kwargs.get("death_sig", signal.SIGTERM)
            pcontext.close(death_sig, self._own_shutdown_timeout)
        super()._shutdown(*args, **kwargs)

    def _start_workers(self, worker_group: WorkerGroup) -> dict[int, Any]:
        wanted = self._own_signals
        if wanted is None or threading.current_thread() is not threading.main_thread():
            return super()._start_workers(worker_group)
        fixed = {getattr(signal, name) for name in FIXED_SIGNALS}
        before = {sig: signal.getsignal(sig) for sig in fixed}
        pids = super()._start_workers(worker_group)
        handler = signal.getsignal(signal.SIGTERM)  # torch's, set just now
        for sig, previous in before.items():
            if previous is not None:  # None: not set from Python; left as torch set it
                signal.signal(sig, previous)
        for name in wanted:
            signal.signal(getattr(signal, name), handler)
        return pids
