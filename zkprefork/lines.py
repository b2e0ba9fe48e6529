"""Line framing for the master's non-blocking pipes and sockets."""

CHUNK = 65536


class LineReader:
    """Reads what a non-blocking pipe or socket has and splits it into lines.

    `read(size) -> bytes` is the source's own read (`sock.recv`, or
    `os.read` on an fd); a line cut in two by a read is kept until its end
    arrives."""

    def __init__(self, read):
        self._read = read
        self._partial = b''

    def lines(self):
        """The complete, non-empty lines (str, without the newline) read now;
        [] if nothing was ready; None at end of file."""
        try:
            chunk = self._read(CHUNK)
        except BlockingIOError:
            return []
        except OSError:
            chunk = b''  # a reset link is a closed one
        if not chunk:
            return None
        lines = (self._partial + chunk).split(b'\n')
        self._partial = lines.pop()
        return [line.decode(errors='replace') for line in lines if line.strip()]
