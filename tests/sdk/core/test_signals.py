"""The one owner of stepguard's signal handlers: real signals sent to this process (SIGUSR1/2,
so a mistake never ends the test run), real handlers installed and restored."""

from __future__ import annotations

import os
import signal

import pytest

from stepguard._private import signals as owner

SIG = signal.SIGUSR1


@pytest.fixture(autouse=True)
def _clean():
    signal.signal(SIG, signal.SIG_DFL)
    yield
    signal.signal(SIG, signal.SIG_DFL)


def test_a_block_turns_the_signal_into_an_unwinding_exit_and_restores_the_default():
    cleaned = []
    with pytest.raises(owner.Terminated) as exc:
        with owner.unwind_on(SIG):
            try:
                os.kill(os.getpid(), SIG)
            finally:
                cleaned.append("finally ran")
    assert exc.value.code == 128 + SIG and isinstance(exc.value, SystemExit)
    assert cleaned == ["finally ran"]
    assert signal.getsignal(SIG) is signal.SIG_DFL


def test_nested_blocks_share_one_handler_and_ignore_repeats_while_unwinding():
    seen = []
    with pytest.raises(owner.Terminated):
        with owner.unwind_on(SIG):
            try:
                with owner.unwind_on(SIG):
                    os.kill(os.getpid(), SIG)
            finally:
                # a second delivery during cleanup must not interrupt it
                assert signal.getsignal(SIG) is signal.SIG_IGN
                os.kill(os.getpid(), SIG)
                seen.append("cleanup finished")
    assert seen == ["cleanup finished"]
    assert signal.getsignal(SIG) is signal.SIG_DFL


def test_a_hosts_handler_is_left_alone_unless_the_block_takes_over():
    calls = []

    def host(signum, frame):
        calls.append(signum)

    signal.signal(SIG, host)
    with owner.unwind_on(SIG):
        assert signal.getsignal(SIG) is host
        os.kill(os.getpid(), SIG)
    assert calls == [SIG]
    with pytest.raises(owner.Terminated), owner.unwind_on(SIG, take_over=True):
        os.kill(os.getpid(), SIG)
    assert signal.getsignal(SIG) is host and calls == [SIG]


def test_hooks_run_before_the_hosts_handler_and_delivery_waits_for_a_deferred_block():
    order = []

    def host(signum, frame):
        order.append("host")

    def hook(signum):
        order.append("hook")

    signal.signal(SIG, host)
    assert owner.on_signal(SIG, hook)
    try:
        with owner.deferred():
            os.kill(os.getpid(), SIG)
            order.append("append finished")
        assert order == ["append finished", "hook", "host"]
    finally:
        owner.remove_hooks(SIG, hook)
    assert signal.getsignal(SIG) is host


def test_death_hooks_run_only_when_the_signal_would_end_the_process():
    marks = []
    assert owner.on_death(SIG, lambda s: marks.append("death"))
    try:
        with pytest.raises(owner.Terminated), owner.unwind_on(SIG):
            os.kill(os.getpid(), SIG)
        assert marks == []  # unwinding: the step's own cleanup records the end
    finally:
        owner.remove_hooks(SIG, *owner._slot(SIG).death_hooks)
    assert signal.getsignal(SIG) is signal.SIG_DFL
