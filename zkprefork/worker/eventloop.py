"""A worker's event loop: asyncore's dispatch on one persistent epoll set.

`asyncore.poll2` builds a new poll object on every call, asks every
dispatcher readable() and writable(), registers it, and has the kernel
scan them all, however few are ready: its cost per pass grows with the
connections a worker holds, not with the work it does. `SocketMap` is
asyncore's socket map that also keeps an epoll set of its dispatchers:
each is registered once, and its interest is changed only when its
readable() / writable() answer changes. A pass asks only the dispatchers
whose answers may have changed since the previous one:

- a dispatcher new in the map;
- a dispatcher that had events (its handlers may have changed it);
- every dispatcher after zope.server's trigger fired: a pool thread changes
  its channel's answers (hands it back, leaves output to send, closes it),
  then pulls the trigger to wake the loop -- as it must for poll2 too;
- the listening sockets, on every pass (whether one accepts may depend on
  more than its events: zope.server's server stops at its connection
  limit, and a worker may leave new connections to the others);
- every dispatcher after `ask_all()`: for code that changes a dispatcher
  outside its handlers and without the trigger (the worker calls it after
  its once-a-second chores).

Otherwise it keeps poll2's semantics: the same rules (a listening socket is
never watched for writing; a dispatcher that wants neither is not watched
at all, not even for a hang-up), and the same handlers (asyncore.readwrite:
handle_read_event, handle_write_event, handle_expt_event, handle_close),
with the map changing under them (accepts, closes).

It is asyncore's map itself because a dispatcher must leave epoll before
its socket is closed: afterwards the fd number no longer names it (and a
socket still open in another process, like the shared listening socket,
would stay in the set and keep reporting). asyncore's close() deletes the
dispatcher from its map first, which is where the fd leaves epoll.
selectors is not used: it folds hang-ups, errors and urgent data into
read/write readiness, which asyncore's handlers tell apart.
"""
import asyncore
import select

from zope.server import dualmodechannel

READ = select.EPOLLIN | select.EPOLLPRI
WRITE = select.EPOLLOUT


class SocketMap(dict):
    """asyncore's socket map (fd -> dispatcher) with its epoll set."""

    def __init__(self):
        super().__init__()
        self._epoll = select.epoll()
        self._events = {}     # fd -> the event mask epoll has for it
        self._asking = set()  # fds whose readable() / writable() the next pass asks
        self._everyone = False  # the next pass asks every dispatcher
        self._listening = set()  # fds of accepting dispatchers, asked on every pass

    def __setitem__(self, fd, dispatcher):
        if self.get(fd) is not dispatcher:
            self._forget(fd)  # another dispatcher's registration under a reused fd
        super().__setitem__(fd, dispatcher)
        self._asking.add(fd)

    def __delitem__(self, fd):
        super().__delitem__(fd)
        self._forget(fd)
        self._listening.discard(fd)

    def clear(self):
        for fd in list(self._events):
            self._forget(fd)
        self._listening.clear()
        super().clear()

    def _forget(self, fd):
        if self._events.pop(fd, None) is not None:
            try:
                self._epoll.unregister(fd)
            except OSError:
                pass  # its socket was closed without leaving the map first

    def ask_all(self):
        """Have the next pass ask every dispatcher readable() and writable()."""
        self._everyone = True

    def poll(self, timeout):
        """One pass of the loop, like asyncore.poll2(timeout, self):
        `timeout` in seconds (None: until something is ready)."""
        self._update_interest()
        ready = [(fd, flags, self.get(fd)) for fd, flags in
                 self._epoll.poll(-1 if timeout is None else timeout)]
        asking = self._asking
        trigger = dualmodechannel.the_trigger
        for fd, flags, dispatcher in ready:
            # A handler may close another dispatcher, whose fd a new one
            # reuses: its events are not the new one's.
            if dispatcher is not None and self.get(fd) is dispatcher:
                asking.add(fd)
                if dispatcher is trigger:
                    self._everyone = True
                asyncore.readwrite(dispatcher, flags)

    def _asked(self):
        """The (fd, dispatcher) pairs this pass asks, and forget them."""
        if self._everyone:
            self._everyone = False
            self._asking.clear()
            return list(self.items())
        asking, self._asking = self._asking, set()
        asking.update(self._listening)
        return [(fd, self[fd]) for fd in asking if fd in self]

    def _update_interest(self):
        registered = self._events
        for fd, dispatcher in self._asked():
            events = READ if dispatcher.readable() else 0
            if dispatcher.accepting:
                self._listening.add(fd)
            elif dispatcher.writable():
                events |= WRITE
            known = registered.get(fd, 0)
            if events == known:
                continue
            try:
                if not events:
                    self._forget(fd)
                elif not known:
                    self._epoll.register(fd, events)
                else:
                    self._epoll.modify(fd, events)
            except OSError:
                # A closed socket still in the map: poll() would answer POLLNVAL.
                registered.pop(fd, None)
                asyncore.readwrite(dispatcher, select.POLLNVAL)
                continue
            if events:
                registered[fd] = events


class Poll2:
    """Where there is no epoll (not Linux): asyncore's own poll2, same calls."""

    def poll(self, timeout):
        asyncore.poll2(timeout)

    def ask_all(self):
        pass  # poll2 asks every dispatcher on every pass


def install():
    """Make a fresh SocketMap asyncore's map and return it (a Poll2 without
    epoll). Call it before any dispatcher is created: each keeps the map it
    was created with."""
    if not hasattr(select, 'epoll'):
        asyncore.socket_map = {}
        return Poll2()
    asyncore.socket_map = SocketMap()
    return asyncore.socket_map
