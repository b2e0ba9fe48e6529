"""What wakes a worker's asyncore loop besides HTTP: signals and the master.

A signal handler that only sets a flag does not interrupt poll() (PEP 475
retries it), so the loop would sleep until its timeout; the wake-up fd
makes poll() return at once.
"""
import asyncore
import os
import signal


class SignalWakeup(asyncore.file_dispatcher):

    def __init__(self):
        read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)
        super().__init__(read_end)
        os.close(read_end)  # file_dispatcher keeps its own dup
        signal.set_wakeup_fd(write_end)  # open for the worker's life

    def writable(self):
        return False

    def handle_read(self):
        try:
            self.recv(512)
        except BlockingIOError:
            pass


class LinkWatcher(asyncore.dispatcher):
    """Watches the socket to the master: end of file means it died."""

    def __init__(self, link, on_gone):
        super().__init__(link)
        self._on_gone = on_gone

    def writable(self):
        return False

    def handle_read(self):
        try:
            data = self.recv(512)
        except OSError:
            data = b''
        if not data:
            self.del_channel()
            self._on_gone()

    def handle_close(self):
        self.del_channel()
        self._on_gone()
