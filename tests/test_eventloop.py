"""zkprefork.worker.eventloop.SocketMap: asyncore's dispatch on a persistent epoll
set, with real sockets (the worker's end-to-end behaviour is in test_http.py
and test_core.py)."""
import asyncore
import socket
import threading

import pytest

from zkprefork.worker import eventloop
from zope.server import dualmodechannel, trigger


@pytest.fixture
def loop(monkeypatch):
    monkeypatch.setattr(asyncore, 'socket_map', asyncore.socket_map)  # restored afterwards
    installed = eventloop.install()
    monkeypatch.setattr(dualmodechannel, 'the_trigger', trigger.trigger())
    yield installed
    asyncore.close_all(installed)


class Peer(asyncore.dispatcher):
    """One end of a socketpair; records what the loop made it do."""

    def __init__(self, sock, want_read=True):
        super().__init__(sock)
        self.want_read, self.outbuf, self.calls = want_read, b'', []

    def readable(self):
        return self.want_read

    def writable(self):
        return bool(self.outbuf)

    def handle_read(self):
        data = self.recv(4096)
        self.calls.append(('read', data))

    def handle_write(self):
        self.outbuf = self.outbuf[self.send(self.outbuf):]
        self.calls.append(('write', len(self.outbuf)))

    def handle_close(self):
        self.calls.append(('close',))
        self.close()


def pair(**kwargs):
    ours, theirs = socket.socketpair()
    theirs.settimeout(5)
    return Peer(ours, **kwargs), theirs


def test_reads_writes_and_hang_ups_reach_asyncore_handlers(loop):
    peer, other = pair()
    other.sendall(b'ping')
    loop.poll(1)
    assert peer.calls == [('read', b'ping')]
    peer.outbuf = b'pong'
    loop.ask_all()  # changed outside its handlers
    loop.poll(1)
    assert other.recv(10) == b'pong' and peer.calls[-1] == ('write', 0)
    other.close()
    loop.poll(1)
    loop.poll(1)
    assert ('close',) in peer.calls and peer._fileno not in loop


def test_interest_changed_by_its_own_handler_is_seen_without_ask_all(loop):
    peer, other = pair()

    def reply():
        Peer.handle_read(peer)
        peer.outbuf = b'answer'
    peer.handle_read = reply
    other.sendall(b'question')
    loop.poll(1)
    loop.poll(1)
    assert other.recv(10) == b'answer'


def test_a_pool_thread_change_is_seen_once_it_pulls_the_trigger(loop):
    peer, other = pair()
    loop.poll(0)

    def pool_thread():
        peer.outbuf = b'from a thread'
        dualmodechannel.the_trigger.pull_trigger()
    thread = threading.Thread(target=pool_thread)
    thread.start()
    thread.join()
    loop.poll(1)  # woken by the trigger
    loop.poll(1)  # asks everyone: the peer is writable
    assert other.recv(20) == b'from a thread'


def test_a_dispatcher_that_wants_nothing_is_not_watched_even_for_hang_ups(loop):
    peer, other = pair(want_read=False)
    other.close()
    loop.poll(0.05)
    assert peer.calls == []
    peer.want_read = True
    loop.ask_all()
    loop.poll(1)
    assert peer.calls[0][0] in ('read', 'close')


def test_a_closed_listening_socket_leaves_epoll_though_another_process_holds_it(loop):
    listening = socket.create_server(('127.0.0.1', 0))
    kept = listening.dup()  # as the master and the other workers keep the shared socket
    server = asyncore.dispatcher(listening)
    server.accepting = True
    loop.poll(0)
    client = socket.create_connection(kept.getsockname())
    server.close()
    peer, other = pair()
    peer.want_read = False
    loop.poll(0)
    assert loop._epoll.poll(0) == []  # nothing left that reports the pending connection
    client.close()
    kept.close()


def test_events_of_a_closed_dispatcher_never_reach_the_one_that_reuses_its_fd(loop):
    first, first_other = pair()
    second, second_other = pair()
    reused = []

    def close_and_reuse():
        fd = second._fileno
        second.close()
        newcomer, newcomer_other = pair()
        reused.append((newcomer, newcomer_other))
        assert newcomer._fileno == fd
    first.handle_read = close_and_reuse
    first_other.sendall(b'x')
    second_other.sendall(b'y')
    loop.poll(1)
    newcomer, _ = reused[0]
    assert newcomer.calls == []


def test_without_epoll_the_loop_is_asyncore_poll2(monkeypatch):
    monkeypatch.setattr(asyncore, 'socket_map', asyncore.socket_map)
    monkeypatch.delattr(eventloop.select, 'epoll')
    loop = eventloop.install()
    peer, other = pair()
    other.sendall(b'ping')
    loop.ask_all()
    loop.poll(1)
    assert peer.calls == [('read', b'ping')] and type(asyncore.socket_map) is dict
    asyncore.close_all()
    other.close()


def test_a_listening_socket_is_asked_on_every_pass(loop):
    listening = socket.create_server(('127.0.0.1', 0))
    server = asyncore.dispatcher(listening)
    server.accepting, accepts, willing = True, [], [False]
    server.readable = lambda: willing[0]  # like a worker leaving connections to the others
    server.handle_accept = lambda: accepts.append(listening.accept()[0])
    client = socket.create_connection(listening.getsockname())
    loop.poll(0.05)
    assert accepts == []
    willing[0] = True
    loop.poll(0)  # asked again though nothing happened to it
    loop.poll(1)
    assert len(accepts) == 1
    accepts[0].close()
    client.close()
