"""Scale, reload and recycling without processes: the broker's draining and control checks
(PoolState with a fake clock) and the supervisor's slot bookkeeping (fake processes)."""
from __future__ import annotations

from pathlib import Path

import pytest
from test_state import ALICE, W1, W2, Clock, client_out, dispatched, infer, make_state, only_error, ready, reply, worker_out

from modelpool.broker.config import ModelConfig, PoolConfig
from modelpool.broker.state import WorkerState
from modelpool.broker.supervisor import EXIT_LOAD_FAILED, Supervisor
from modelpool.client import protocol
from modelpool.client.errors import Forbidden, InvalidInput, NotSupported, Unavailable
from modelpool.client.protocol import Command


@pytest.fixture()
def clock() -> Clock:
    return Clock()


# --- the broker: draining, recycling, who may control -----------------------------------------


def test_a_retired_worker_finishes_what_it_holds_takes_nothing_new_then_is_sent_away(clock):
    state = make_state(clock, "m")
    ready(state, W1, "m")
    ready(state, W2, "m")
    infer(state, ALICE, "m", b"1")
    ((busy, _, _),) = dispatched(state)
    idle = W2 if busy == W1 else W1
    assert state.retire(busy)
    assert state.workers[busy].state is WorkerState.DRAINING and state.models[b"m"].ready == 1
    infer(state, ALICE, "m", b"2")
    assert dispatched(state) == [(idle, ALICE, b"2")]  # the new request goes to the other one
    reply(state, busy, ALICE, b"1")
    assert [r.status for _, r in client_out(state)] == [protocol.OK]
    ((who, message),) = worker_out(state)
    assert who == busy and message.command is Command.DISCONNECT
    assert busy not in state.workers and state.models[b"m"].ready == 1


def test_an_idle_retired_worker_leaves_at_once_and_an_unknown_one_is_not_retired(clock):
    state = make_state(clock, "m")
    ready(state, W1, "m")
    assert state.retire(W1)
    assert [(w, m.command) for w, m in worker_out(state)] == [(W1, Command.DISCONNECT)]
    assert not state.retire(W1)  # gone: the launcher stops the process instead


def test_a_worker_past_max_requests_is_recycled_once(clock):
    state = make_state(clock)
    state.add_model("m", expected=1, version="1", max_requests=2)
    ready(state, W1, "m", capacity=4)
    for rid in (b"1", b"2", b"3"):
        infer(state, ALICE, "m", rid)
    for rid in (b"1", b"2", b"3"):
        reply(state, W1, ALICE, rid)
    assert state.recycle == [W1] and state.models[b"m"].recycled == 1
    assert state.workers[W1].state is WorkerState.READY  # serves until its successor is ready


def test_a_worker_past_max_memory_is_recycled(clock):
    state = make_state(clock)
    state.add_model("m", expected=1, version="1", max_memory_mb=100)
    ready(state, W1, "m")
    infer(state, ALICE, "m", b"1")
    dispatched(state)
    state.worker_message(W1, protocol.encode_replies(
        [protocol.ReplyItem(ALICE, b"1", protocol.OK, [protocol.packb({"outputs": []})])],
        {"calls": [[1, 50]], "rss_bytes": 99 * 2**20}))
    assert state.recycle == []
    infer(state, ALICE, "m", b"2")
    dispatched(state)
    state.worker_message(W1, protocol.encode_replies(
        [protocol.ReplyItem(ALICE, b"2", protocol.OK, [protocol.packb({"outputs": []})])],
        {"calls": [[1, 50]], "rss_bytes": 101 * 2**20}))
    assert state.recycle == [W1]


def test_control_is_local_only_and_needs_a_launcher(clock):
    state = make_state(clock, "m")
    request = protocol.encode_request(protocol.MMI_SCALE, b"c1", {"model": "m", "replicas": 2})
    state.client_message(ALICE, request)
    assert "starts no workers of its own" in only_error(state, ALICE, b"c1", b"501", NotSupported)
    calls = []
    state.control = lambda service, header: calls.append((service, header)) or {"model": "m", "replicas": 2}
    state.peer_local = False
    state.client_message(ALICE, request)
    assert "own host only" in only_error(state, ALICE, b"c1", b"403", Forbidden) and calls == []
    state.peer_local = True
    state.client_message(ALICE, request)
    ((_, answer),) = client_out(state)
    assert answer.header == {"model": "m", "replicas": 2} and calls == [(protocol.MMI_SCALE, {"model": "m",
                                                                                               "replicas": 2})]

    def refuse(service, header):
        raise InvalidInput("replicas must be an integer from 0 to 64, got 65")

    state.control = refuse
    state.client_message(ALICE, request)
    assert "from 0 to 64" in only_error(state, ALICE, b"c1", b"400", InvalidInput)


def test_scaling_to_zero_answers_the_queue_503(clock):
    state = make_state(clock, "m", expected=1)
    infer(state, ALICE, "m", b"1")  # waits for a replica that is starting
    state.set_expected("m", 0)
    assert "scaled to 0 replicas" in only_error(state, ALICE, b"1", b"503", Unavailable)


# --- the supervisor: slots added, retired, replaced ---------------------------------------------


class FakeProcess:
    pids = iter(range(1000, 100000))

    def __init__(self, target=None, args=(), name="", daemon=True) -> None:
        self.pid = next(self.pids)
        self.exitcode: int | None = None
        self.sentinel = self.pid

    def start(self) -> None:
        pass

    def join(self, timeout=None) -> None:
        pass


class FakeContext:
    Process = FakeProcess


def supervisor(tmp_path: Path, replicas: int = 2) -> Supervisor:
    (tmp_path / "m.keras").write_bytes(b"")
    config = PoolConfig(models=(ModelConfig(name="m", path=str(tmp_path / "m.keras"), replicas=replicas),))
    sup = Supervisor(config, "ipc:///nowhere", now=Clock())
    sup.ctx = FakeContext()
    sup.start_due()
    for slot in sup.slots:
        sup.mark_ready(slot.identity)
    return sup


def exit_with(sup: Supervisor, slot, code: int) -> str | None:
    slot.process.exitcode = code
    return sup.reap(slot)


def test_scale_up_adds_slots_and_scale_down_retires_the_not_ready_then_the_newest(tmp_path):
    sup = supervisor(tmp_path)
    assert sup.scale("m", 4) == [] and len(sup.slots) == 4
    sup.start_due()
    sup.mark_ready(sup.slots[2].identity)  # slot 3 is still loading
    victims = sup.scale("m", 1)
    assert [s.index for s in victims] == [3, 2, 1] and all(s.retiring for s in victims)
    for victim in victims:
        exit_with(sup, victim, 0)
    assert [s.index for s in sup.slots] == [0] and sup.live("m") == sup.slots and sup.replicas["m"] == 1


def test_a_retired_slot_is_not_restarted_and_a_crashed_one_is(tmp_path):
    sup = supervisor(tmp_path)
    (victim,) = sup.scale("m", 1)
    exit_with(sup, victim, 0)
    assert victim not in sup.slots and sup.next_restart() is None
    (kept,) = sup.slots
    exit_with(sup, kept, -9)
    assert kept in sup.slots and sup.next_restart() is not None


def test_replace_starts_a_successor_and_retires_the_old_slot_once_it_is_ready(tmp_path):
    sup = supervisor(tmp_path, replicas=1)
    (old,) = sup.slots
    assert sup.replace(old.identity) and not sup.replace(old.identity)  # once
    sup.start_due()
    new = old.replaced_by
    assert new.process is not None and sup.live("m") == [new] and sup.to_retire == []
    sup.mark_ready(new.identity)
    assert sup.to_retire == [old] and old.retiring and old.replaced_by is None


def test_a_successor_that_cannot_load_is_dropped_and_the_old_slot_stays(tmp_path):
    sup = supervisor(tmp_path, replicas=1)
    (old,) = sup.slots
    assert sup.reload("m") == 1
    sup.start_due()
    new = old.replaced_by
    assert exit_with(sup, new, EXIT_LOAD_FAILED) == "failed to load its model"
    assert sup.slots == [old] and old.replaced_by is None and not old.retiring and sup.next_restart() is None
