"""The one implementation behind both clients: replicas and their channels, retries, replica choice,
request building, result mapping and errors. `RolloutClient` (blocking) and `AsyncRolloutClient`
(asyncio) are thin faces over it: each call is "build the request here, invoke the stub there, map
the reply here", and only the invoking differs (a value or an awaitable).

Retries are gRPC's own: every channel carries a service config whose retry policy covers the calls
that are safe to repeat (GetStatus, health checks, and Generate until its first completion arrives,
which is when gRPC commits a server-streaming call). So any gRPC client, in any language, gets the
same behaviour from `RETRY_METHODS` and the policy's JSON.

Several replicas: a call that spans them (a batch, a push, a status round) is a *flow* here, a
generator that yields the calls to make at once (`Op`s) or CPU work (`Compute`) and receives their
outcomes (a value, or the RolloutError); the faces only run what it yields (threads or gather). A
batch's prompts are split by each replica's free capacity (whole groups per replica); a replica that
fails for a reason of its own (`REPLICA_FAULTS`) while others work is set aside: it gets no work until
`rejoin`, and its share goes to the others. With one replica in service every flow makes exactly the
calls a one-replica client makes, and failures reach the caller.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Generator, Iterable, Iterator, Mapping, Sequence, TypeVar

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2_grpc

from fastgrpo.client.types import Completion, GroupedBatch, ReplicaState, RolloutError, Status, UpdateResult
from fastgrpo.client.weights import PushPlan, plan_push
from fastgrpo.v1 import rollout_pb2 as pb
from fastgrpo.v1 import rollout_pb2_grpc as pb_grpc
from fastgrpo.wire.convert import to_pb
from fastgrpo.wire.records import Sampling

Prompt = str | Sequence[int]
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
]
# (service, method) of the calls that are safe to repeat; UpdateWeights and TrainDraft are not
RETRY_METHODS = [
    {"service": "fastgrpo.v1.RolloutService", "method": "GetStatus"},
    {"service": "fastgrpo.v1.RolloutService", "method": "Generate"},
    {"service": "grpc.health.v1.Health"},
]
GRPC_MAX_ATTEMPTS = 5  # gRPC caps a retry policy's attempts here
# failures that say "this replica is unwell", not "this call is wrong": down, cut off, too slow, or
# serving other weights than the caller's (a stale base version, another checksum)
REPLICA_FAULTS = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
                            grpc.StatusCode.DATA_LOSS, grpc.StatusCode.FAILED_PRECONDITION})
log = logging.getLogger("fastgrpo.client")


@dataclass(frozen=True)
class RetryPolicy:
    """How calls that are safe to repeat are retried, as gRPC's own retry policy does it: on
    UNAVAILABLE, with exponential backoff and full jitter. wait_for_ready (on by default): such a
    call made while no connection can be made waits for one, until its deadline, instead of failing
    at once, so it rides out a restart of the service; an address where no service ever comes up
    then fails at the call's deadline."""

    max_attempts: int = 5  # 1 = no retries; gRPC allows at most 5
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    multiplier: float = 2.0
    wait_for_ready: bool = True

    def __post_init__(self):
        if not 1 <= self.max_attempts <= GRPC_MAX_ATTEMPTS:
            raise ValueError(f"max_attempts must be in [1, {GRPC_MAX_ATTEMPTS}] (gRPC's limit), got {self.max_attempts}; "
                             "to outlast a restart, use wait_for_ready=True and a longer timeout")
        if not (self.initial_backoff_s > 0 and self.max_backoff_s > 0 and self.multiplier > 0):
            raise ValueError("backoffs and multiplier must be positive")

    def service_config(self) -> str:
        """The gRPC service config (JSON) that implements this policy."""
        method: dict = {"name": RETRY_METHODS}
        if self.wait_for_ready:
            method["waitForReady"] = True
        if self.max_attempts > 1:
            method["retryPolicy"] = {
                "maxAttempts": self.max_attempts,
                "initialBackoff": f"{self.initial_backoff_s}s",
                "maxBackoff": f"{self.max_backoff_s}s",
                "backoffMultiplier": self.multiplier,
                "retryableStatusCodes": ["UNAVAILABLE"],
            }
        return json.dumps({"methodConfig": [method]})


NO_RETRY = RetryPolicy(max_attempts=1, wait_for_ready=False)  # every call once, failing at once when it cannot connect


@contextlib.contextmanager
def errors(method: str) -> Iterator[None]:
    """A failed call inside raises RolloutError with its status code and the server's message."""
    try:
        yield
    except grpc.RpcError as exc:
        raise RolloutError(exc.code(), exc.details() or "", method) from None


def not_serving(address: str) -> RolloutError:
    """A replica's health stream ended without ever answering SERVING (it is shutting down)."""
    return RolloutError(grpc.StatusCode.UNAVAILABLE, f"{address} stopped before it was serving", "Health.Watch")


# a channel whose calls fail at once on a replica that is down, rather than wait for it or retry
# (gRPC retries a Generate cut before its first completion, and that retry waits out the deadline on a
# killed replica). Its connection is its own (gRPC otherwise shares one between channels of equal
# arguments), so a new one starts without the reconnect backoff an old one gathered while it was down.
FAIL_FAST_OPTIONS = CHANNEL_OPTIONS + [("grpc.enable_retries", 0), ("grpc.use_local_subchannel_pool", 1)]


class Replica:
    """One rollout service: its channels (blocking or asyncio) and the stubs on them. `channel` follows
    the client's RetryPolicy; `fail_fast` serves calls spread over several replicas, where another
    replica takes the work of one that is down."""

    def __init__(self, address: str, creds: grpc.ChannelCredentials | None, options: list, aio: bool):
        self.address = address
        self._creds = creds
        self._aio = aio
        self.channel = self._open(options)
        self.stub = pb_grpc.RolloutServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.retired: list = []  # fail-fast channels replaced by a new one, closed with the client
        self.fail_fast = None
        self._open_fail_fast()
        self.renew = False  # open a new fail-fast channel before its next call

    def _open(self, options: list):
        transport = grpc.aio if self._aio else grpc
        if self._creds is None:
            return transport.insecure_channel(self.address, options=options)
        return transport.secure_channel(self.address, self._creds, options=options)

    def _open_fail_fast(self) -> None:
        if self.fail_fast is not None:
            self.retired.append(self.fail_fast)
        self.fail_fast = self._open(FAIL_FAST_OPTIONS)
        self.fail_fast_stub = pb_grpc.RolloutServiceStub(self.fail_fast)

    def stub_for(self, wait: bool) -> pb_grpc.RolloutServiceStub:
        """The stub to call on: the fail-fast one unless `wait`. After `renew` was set (the replica is
        back from being away) a new fail-fast channel connects at once, opened here, where the call
        runs (an asyncio channel belongs to the loop it is opened in)."""
        if wait:
            return self.stub
        if self.renew:
            self.renew = False
            self._open_fail_fast()
        return self.fail_fast_stub

    def channels(self) -> list:
        """Every channel this replica opened, to close."""
        return [self.channel, self.fail_fast, *self.retired]

    def probe_channel(self):
        """A fail-fast channel of its own: a probe's answer is about now, over a fresh connection.
        Close it after use."""
        return self._open(FAIL_FAST_OPTIONS)


class ClientCore:
    """What a client holds and decides; it makes no call itself (the faces do)."""

    def __init__(self, address: str | Sequence[str], *, token: str | None, tls: bool, root_certificates: bytes | None,
                 timeout: float, retry: RetryPolicy, aio: bool):
        addresses = [address] if isinstance(address, str) else list(address)
        if not addresses:
            raise ValueError("at least one address is required")
        creds = grpc.ssl_channel_credentials(root_certificates=root_certificates) if tls or root_certificates else None
        options = CHANNEL_OPTIONS + [("grpc.service_config", retry.service_config()),
                                     ("grpc.enable_retries", int(retry.max_attempts > 1))]
        self.replicas = [Replica(a, creds, options, aio) for a in addresses]
        self.timeout = timeout
        self.retry = retry
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._next = itertools.count()
        self._lock = threading.Lock()  # guards the replicas' states (a blocking client may serve threads)
        self._states = [ReplicaState(a, in_service=True) for a in addresses]

    def options(self, timeout: float | None, wait_for_ready: bool | None = None) -> dict:
        """Keyword arguments of every stub call: the deadline, the credentials, and whether to wait for a
        replica that cannot be reached (None: as the retry policy says)."""
        return {"timeout": timeout or self.timeout, "metadata": self._metadata, "wait_for_ready": wait_for_ready}

    # ------------------------------------------------------------ which replicas get work
    def in_service(self) -> list[int]:
        with self._lock:
            return [i for i, s in enumerate(self._states) if s.in_service]

    def states(self) -> list[ReplicaState]:
        with self._lock:
            return list(self._states)

    def first_in_service(self, replica: int | None) -> int:
        """`replica`, or by default the first replica in service."""
        return self.in_service()[0] if replica is None else replica

    def next_replica(self) -> Replica:
        """Streamed Generate calls go to the replicas in service round-robin."""
        serving = self.in_service()
        return self.replicas[serving[next(self._next) % len(serving)]]

    def set_aside(self, replica: int, error: RolloutError) -> None:
        """Gives replica no more work until `rejoin`, after it failed with `error`. Raises `error`
        instead when it says the call was wrong (not in REPLICA_FAULTS) or when replica is the last
        one in service: with nothing else to turn to, the caller sees the failure."""
        if error.code not in REPLICA_FAULTS:
            raise error
        with self._lock:
            state = self._states[replica]
            if state.in_service and sum(s.in_service for s in self._states) == 1:
                raise error
            if not state.in_service:
                return
            self._states[replica] = dataclasses.replace(state, in_service=False, set_asides=state.set_asides + 1,
                                                        last_error=str(error))
        log.warning("replica %s set aside: %s", state.address, error)

    def rejoin(self, replica: int) -> None:
        """Puts replica back in service (the caller has made it serve the right weights)."""
        with self._lock:
            state = self._states[replica]
            self._states[replica] = dataclasses.replace(state, in_service=True, rejoins=state.rejoins + 1)
        if not state.in_service:
            self.replicas[replica].renew = True

    def settle(self, failures: Sequence[tuple[int, RolloutError]], others_work: bool) -> None:
        """After a round of calls: raises the first failure when nothing else works or a call was
        wrong (every replica would refuse it); otherwise sets aside each replica that failed."""
        wrong = [exc for _, exc in failures if exc.code not in REPLICA_FAULTS]
        if wrong or (failures and not others_work):
            raise (wrong or [failures[0][1]])[0]
        for replica, exc in failures:
            self.set_aside(replica, exc)


def generate_request(prompts: Sequence[Prompt], num_samples: int, sampling: Sampling, request_id: str) -> pb.GenerateRequest:
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of prompts (strings or token-id lists), not one string")
    return pb.GenerateRequest(request_id=request_id, prompts=[_prompt(p) for p in prompts], num_samples=num_samples,
                              sampling=to_pb(sampling))


def _prompt(p: Prompt) -> pb.Prompt:
    if isinstance(p, str):
        return pb.Prompt(text=p)
    return pb.Prompt(token_ids=pb.TokenIds(ids=[int(t) for t in p]))


def train_draft_request(run_now: bool, every_n_batches: int | None) -> pb.TrainDraftRequest:
    if every_n_batches is not None and every_n_batches < 0:
        raise ValueError(f"every_n_batches must be >= 0 (0 = off), got {every_n_batches}")
    return pb.TrainDraftRequest(run_now=run_now, set_policy=every_n_batches is not None,
                                every_n_batches=every_n_batches or 0)


def group_completions(completions: Iterable[Completion], num_prompts: int, num_samples: int) -> GroupedBatch:
    """Completions in any order -> completions[i][j] = sample j of prompt i."""
    groups: list[list[Completion | None]] = [[None] * num_samples for _ in range(num_prompts)]
    for c in completions:
        groups[c.prompt_index][c.sample_index] = c
    return GroupedBatch([list(g) for g in groups])  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ load spreading
def free_slots(s: Status) -> int:
    """Sequences a replica could start now: its running limit less what runs and waits there."""
    return max(s.max_running_sequences - s.running_sequences - s.queued_sequences, 0)


def split_counts(n: int, weights: Sequence[int]) -> list[int]:
    """n items shared in proportion to integer weights, largest remainder first (ties to the earlier);
    all-zero weights share equally. The counts sum to n."""
    if any(w < 0 for w in weights) or not weights:
        raise ValueError(f"weights must be non-negative and not empty, got {list(weights)}")
    if sum(weights) == 0:
        weights = [1] * len(weights)
    total = sum(weights)
    counts = [n * w // total for w in weights]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(n * weights[i] % total), i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    return counts


def capacity_shares(served: Mapping[int, Status]) -> dict[int, int]:
    """replica -> weight of its share of a batch: its free slots; when every replica is full, its
    running limit (the work queues everywhere, in proportion to how fast each can drain it)."""
    free = {r: free_slots(s) for r, s in served.items()}
    if sum(free.values()) == 0:
        return {r: max(s.max_running_sequences, 1) for r, s in served.items()}
    return free


def split_prompts(pending: Sequence[int], shares: Mapping[int, int]) -> list[tuple[int, list[int]]]:
    """(replica, the prompt indices it generates): consecutive runs of `pending`, in replica order,
    sized by `shares`; a replica whose share rounds to nothing is left out."""
    parts, start = [], 0
    for replica, count in zip(shares, split_counts(len(pending), list(shares.values()))):
        if count:
            parts.append((replica, list(pending[start : start + count])))
        start += count
    return parts


def part_sampling(sampling: Sampling, first_prompt: int) -> Sampling:
    """Sampling of the part of a batch that starts at prompt `first_prompt`. The service seeds each
    sequence from (seed, prompt index within the request, sample index), so parts sent with one seed
    would draw the same noise for their k-th prompts; each part gets a seed of its own, derived from
    where it starts (the part at prompt 0 keeps the caller's: one replica samples as before)."""
    if sampling.seed is None or first_prompt == 0:
        return sampling
    digest = hashlib.sha256(f"{sampling.seed}:part:{first_prompt}".encode()).digest()
    return dataclasses.replace(sampling, seed=int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


# ------------------------------------------------------------------------------------------ flows
T = TypeVar("T")


@dataclass(frozen=True)
class Op:
    """A call a flow needs made: `method` ("status", "generate" or "push") on replica `replica` with
    `arg` (the GenerateRequest, the PushPlan). The face answers with the call's value (a Status, the
    list of Completions, the UpdateWeightsReply) or the RolloutError it failed with."""

    method: str
    replica: int
    arg: Any = None
    wait: bool = True  # False: over the replica's fail-fast channel (no retries, no waiting for it)
    timeout: float | None = None


@dataclass(frozen=True)
class Compute:
    """CPU work a flow needs done (the asyncio face runs it in a worker thread); answered with its value."""

    fn: Callable[[], Any]


Flow = Generator["list[Op] | Compute", Any, T]


def _failures(targets: Sequence[int], answers: Sequence[Any]) -> list[tuple[int, RolloutError]]:
    return [(r, a) for r, a in zip(targets, answers) if isinstance(a, RolloutError)]


def statuses_flow(core: ClientCore, targets: Sequence[int], timeout: float | None) -> Flow[dict[int, Status]]:
    """GetStatus of `targets` at once -> {replica: Status} of those that answered; those that did not
    are set aside while any answered (ClientCore.settle)."""
    answers = yield [Op("status", r, None, len(targets) == 1, timeout) for r in targets]
    failures = _failures(targets, answers)
    core.settle(failures, others_work=len(failures) < len(targets))
    return {r: a for r, a in zip(targets, answers) if not isinstance(a, RolloutError)}


def generate_batch_flow(core: ClientCore, prompts: Sequence[Prompt], num_samples: int, sampling: Sampling,
                        request_id: str, timeout: float | None) -> Flow[GroupedBatch]:
    """A GRPO batch over the replicas in service: the prompts split by free capacity (all samples of a
    prompt on one replica, so they can draft from each other), generated at once, put back in prompt
    order. The prompts of a replica that fails go to the others in the next round."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of prompts (strings or token-id lists), not one string")
    pending, done = list(range(len(prompts))), []
    while True:
        live = core.in_service()
        if len(live) == 1:  # no load to compare: the whole batch in one call
            parts = [(live[0], pending)]
        else:
            served = yield from statuses_flow(core, live, timeout)
            live = list(served)
            parts = split_prompts(pending, capacity_shares(served))
        requests = [generate_request([prompts[k] for k in idx], num_samples, part_sampling(sampling, idx[0] if idx else 0),
                                     request_id) for _, idx in parts]
        answers = yield [Op("generate", r, req, len(live) == 1, timeout) for (r, _), req in zip(parts, requests)]
        pending = []
        for (_, idx), answer in zip(parts, answers):
            if isinstance(answer, RolloutError):
                pending += idx
            else:  # prompt_index counts within the part's request
                done += [dataclasses.replace(c, prompt_index=idx[c.prompt_index]) for c in answer]
        failures = _failures([r for r, _ in parts], answers)
        core.settle(failures, others_work=len(failures) < len(live))
        if not pending:
            return group_completions(done, len(prompts), num_samples)
        pending.sort()


def push_flow(core: ClientCore, weights, kind: str, replicas: Sequence[int] | None, timeout: float | None,
              **plan_args) -> Flow[list[UpdateResult]]:
    """A weight push to `replicas` (default: those in service), all at once, each reply checked
    (PushPlan.result); a push whose call failed is judged by what that replica serves then
    (PushPlan.after_failure). When some replica accepted the update, those that failed are set aside
    and the mirror advances; when none did, the first failure is raised and the mirror stays."""
    targets = core.in_service() if replicas is None else list(replicas)
    if not targets:
        raise ValueError("replicas: name at least one replica to push to")
    served = yield from statuses_flow(core, targets, timeout)
    targets = list(served)
    plan: PushPlan = yield Compute(lambda: plan_push(weights, kind, served[targets[0]], **plan_args))
    wait = len(targets) == 1
    replies = yield [Op("push", r, plan, wait, timeout) for r in targets]
    failed = [r for r, _ in _failures(targets, replies)]
    now = {}
    if failed:
        now = dict(zip(failed, (yield [Op("status", r, None, wait, timeout) for r in failed])))
    results, failures = [], []
    for r, reply in zip(targets, replies):
        address = core.replicas[r].address
        try:
            if isinstance(reply, RolloutError):  # the update may still have been applied: judge by what is served
                status = now[r]
                results.append(plan.after_failure(reply, None if isinstance(status, RolloutError) else status, address))
            else:
                results.append(plan.result(reply, address))
        except RolloutError as exc:
            failures.append((r, exc))
    core.settle(failures, others_work=bool(results))
    yield Compute(plan.commit)
    return results
