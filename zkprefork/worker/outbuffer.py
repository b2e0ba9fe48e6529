"""A channel's output buffer: bytes in memory, spooled to a file only while
more than `overflow` bytes wait.

zope.server's OverflowableBuffer writes every response into one
SpooledTemporaryFile per connection and never empties it: each append,
get and skip is several seeks and tells through Python wrappers, and once
a keep-alive connection has sent `overflow` bytes in all (1 MB by default:
~7000 hello-world responses) every later response goes through a
temporary file on disk. This buffer has zope.server's interface
(`append`, `get`, `skip`, `len`, `close`) on a deque of the written bytes
objects; only what waits beyond `overflow` (a slow reader of a large
response) is spooled, as zope.server does, and the buffer is back in
memory once that has been sent.
"""
import collections

from zope.server.buffers import OverflowableBuffer


class OutputBuffer:

    def __init__(self, overflow):
        self.overflow = overflow
        self.chunks = collections.deque()  # bytes objects as written ...
        self.offset = 0                    # ... of which the first one's first bytes were sent
        self.size = 0
        self.spooled = None  # an OverflowableBuffer while more than overflow bytes wait

    def __len__(self):
        return self.size

    def append(self, data):
        if type(data) is not bytes:
            data = bytes(data)  # a view of a buffer the application may reuse: copied, as into a file
        if self.spooled is None and self.size + len(data) > self.overflow:
            waiting = self.get()
            self.spooled = OverflowableBuffer(self.overflow)
            self.spooled.append(waiting)
            self.chunks.clear()
            self.offset = 0
        if self.spooled is not None:
            self.spooled.append(data)
        else:
            self.chunks.append(data)
        self.size += len(data)

    def get(self, size=-1, skip=False):
        """Up to `size` bytes (all if negative) from the start; `skip`: and drop them."""
        if self.spooled is not None:
            data = self.spooled.get(size, skip)
            if skip:
                self._sent(len(data))
            return data
        if size < 0 or size > self.size:
            size = self.size
        pieces, wanted, offset = [], size, self.offset
        for chunk in self.chunks:
            piece = chunk[offset:offset + wanted] if offset or wanted < len(chunk) else chunk
            pieces.append(piece)
            wanted -= len(piece)
            offset = 0
            if not wanted:
                break
        data = pieces[0] if len(pieces) == 1 else b''.join(pieces)
        if skip:
            self._drop(size)
        return data

    def skip(self, size, allow_prune=False):
        if size > self.size:
            raise ValueError(f"Can't skip {size} bytes in buffer of {self.size} bytes")
        if self.spooled is not None:
            self.spooled.skip(size)
            self._sent(size)
        else:
            self._drop(size)

    def _drop(self, size):
        self.size -= size
        size += self.offset
        chunks = self.chunks
        while chunks and size >= len(chunks[0]):
            size -= len(chunks.popleft())
        self.offset = size

    def _sent(self, size):
        self.size -= size
        if not self.size:
            self.spooled.close()
            self.spooled = None

    def close(self):
        self.chunks.clear()
        self.offset = self.size = 0
        if self.spooled is not None:
            self.spooled.close()
            self.spooled = None
