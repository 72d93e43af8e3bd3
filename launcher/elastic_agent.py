"""rdzv-launch's agent: torch's LocalElasticAgent (with our exit barrier) and three hooks.

* `_monitor_workers`: a failure that a peer's departure explains is reported to torch's loop as
  a membership change (HEALTHY while the handler counts nodes waiting, which a departure always
  makes it do), so torch restarts the group without counting it (launcher.membership).
* `_rendezvous`: a round that lost a member before ranks were assigned is abandoned for a new
  one (rdzv.rendezvous.round_store); after each round the agent's remaining restarts come from the round's
  job-wide count, and workers get RDZV_ROUND, so every node's workers see the same
  TORCHELASTIC_RESTART_COUNT and round.
* `_rendezvous` also runs `--health-check` first where it is due (launcher.health.gate): at the
  first join, and after this node's own failure, which `_monitor_workers` tells the gate of (its
  workers failed and no departure explains it); a node that fails it stays out of the round
  until it passes.
* `_assign_worker_ranks`: when the sealed round says every member runs the same workers, torch's
  own fast path (`TORCH_ELASTIC_WORKER_IDENTICAL`) assigns worker ranks from the node rank,
  without the two store writes per node and rank 0's O(N) reads of its general path.
* `_invoke_run`: on SIGTERM/SIGINT the node leaves its group before torch stops its workers
  (launcher.leave).
* metrics (`--metrics-port`): a `launcher.metrics.recorder.Recorder` hears of failed workers, each
  round's restart attribution and workers running again.

With a handler that is not ours, the agent is torch's (plus the exit barrier).
"""

from __future__ import annotations

import os
from typing import Any

from torch.distributed.elastic.agent.server.api import (
    DEFAULT_ROLE,
    RunResult,
    WorkerGroup,
    WorkerState,
)
from torch.distributed.elastic.multiprocessing import SignalException

from launcher.exit_barrier import ExitBarrierAgent
from launcher.health.gate import HealthGate
from launcher.leave import leave_gracefully
from launcher.membership import FailureAttribution, membership_of
from launcher.metrics.recorder import FAILURE, NULL_RECORDER, Recorder
from rdzv.rendezvous.round_store import RoundMemberGoneError

ROUND_VAR = "RDZV_ROUND"
WORKER_IDENTICAL_VAR = "TORCH_ELASTIC_WORKER_IDENTICAL"  # torch's switch to its rank fast path


class RdzvAgent(ExitBarrierAgent):
    def __init__(
        self, *args: Any, recorder: Recorder = NULL_RECORDER, health: HealthGate | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._recorder = recorder  # launcher.metrics with --metrics-port, else a no-op
        self._health = health  # --health-check, run before a join where it is due
        recorder.watch_worker_group(lambda: self._worker_group.state.name)
        spec = self._worker_group.spec
        self._membership = membership_of(spec.rdzv_handler)
        self._attribution = (
            FailureAttribution(self._membership, self._reporter, spec.max_restarts, spec.monitor_interval)
            if self._membership is not None
            else None
        )
        # Workers inherit the agent's environment: no stale value from an outer launcher.
        os.environ.pop(ROUND_VAR, None)

    def _monitor_workers(self, worker_group: WorkerGroup) -> RunResult:
        result = super()._monitor_workers(worker_group)
        if result.state == WorkerState.FAILED:
            self._recorder.trouble(FAILURE)  # seen now; the next round says whose it was
        attribution = self._attribution
        if result.state == WorkerState.FAILED and attribution is not None and attribution.decide(self._remaining_restarts):
            # torch's loop then sees nodes waiting (the departure) and restarts uncounted. Not
            # this node's failure: the health check stays as it was.
            return RunResult(state=WorkerState.HEALTHY)
        if result.state in (WorkerState.FAILED, WorkerState.UNHEALTHY) and self._health is not None:
            # This node's own failure (a torch handler cannot tell departures apart: every
            # failure counts as one): check the node again before it rejoins.
            self._health.workers_failed()
        if result.state == WorkerState.HEALTHY and attribution is not None:
            attribution.healthy()
        return result

    def _rendezvous(self, worker_group: WorkerGroup) -> None:
        used = self._membership.restarts if self._membership is not None else None
        if self._health is not None:
            self._health.before_join(worker_group.spec.rdzv_handler)
        while True:
            try:
                super()._rendezvous(worker_group)
                break
            except RoundMemberGoneError as exc:
                # A member died between the seal and rank assignment: no worker started, so
                # nothing to count; the next round forms without it.
                self._reporter.emit("round_abandoned", f"{exc}; rendezvous again", "warning")
        # A recovery is a counted restart when the new round charged the job's budget for it.
        membership = self._membership
        self._recorder.restart_attributed(None if used is None or membership is None else membership.restarts > used)
        if self._attribution is None or self._membership is None:
            return
        self._remaining_restarts = self._attribution.joined()
        round_no = self._membership.round
        if round_no is not None:
            os.environ[ROUND_VAR] = str(round_no)

    def _initialize_workers(self, worker_group: WorkerGroup) -> None:
        super()._initialize_workers(worker_group)
        self._recorder.workers_running()

    def _invoke_run(self, role: str = DEFAULT_ROLE) -> RunResult:
        try:
            return super()._invoke_run(role)
        except SignalException as exc:
            state = self._worker_group.state
            # A node whose workers succeeded (stopped in the exit barrier) ends as a finished
            # node does (launcher.agent closes the run): a departure would restart the others'
            # finishing workers.
            if self._membership is not None and state != WorkerState.SUCCEEDED:
                # Restarting (STOPPED, INIT): nobody to wait for.
                running = state == WorkerState.HEALTHY
                leave_gracefully(self._membership, self._reporter, exc.sigval, workers_running=running)
            raise

    @property
    def workers_succeeded(self) -> bool:
        """Whether this node's workers all finished successfully (even if a signal came later)."""
        return self._worker_group.state == WorkerState.SUCCEEDED

    def _assign_worker_ranks(self, store: Any, group_rank: int, group_world_size: int, spec: Any) -> Any:
        identical = getattr(spec.rdzv_handler, "identical_workers", 0)
        if not identical or identical != spec.local_world_size or os.environ.get(WORKER_IDENTICAL_VAR) == "1":
            return super()._assign_worker_ranks(store, group_rank, group_world_size, spec)
        # torch reads the switch from the environment at this call; set for it alone (workers
        # start later, from the environment as it was).
        os.environ[WORKER_IDENTICAL_VAR] = "1"
        try:
            return super()._assign_worker_ranks(store, group_rank, group_world_size, spec)
        finally:
            os.environ.pop(WORKER_IDENTICAL_VAR, None)
