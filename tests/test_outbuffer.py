"""zkprefork.worker.outbuffer.OutputBuffer against zope.server's OverflowableBuffer,
whose interface it has (the channels' sending is tested end to end in
test_http.py)."""
import random

from zope.server.buffers import OverflowableBuffer

from zkprefork.worker.outbuffer import OutputBuffer


def test_same_bytes_as_zope_servers_buffer_through_random_writes_reads_and_skips():
    rng = random.Random(14)
    spooled = 0
    for _ in range(200):
        ours, theirs, expected = OutputBuffer(5000), OverflowableBuffer(5000), b''
        for _ in range(60):
            action = rng.random()
            if action < 0.5:
                data = rng.randbytes(rng.choice([1, 10, 100, 3000]))
                ours.append(data)
                theirs.append(data)
                expected += data
            elif action < 0.75:
                size = rng.choice([-1, 1, 7, 500, 9000])
                assert ours.get(size) == theirs.get(size) == (expected if size < 0 else expected[:size])
            else:
                size = rng.randrange(len(expected) + 1)
                if action < 0.9:
                    ours.skip(size, 1)
                    theirs.skip(size, 1)
                else:
                    assert ours.get(size, True) == theirs.get(size, True) == expected[:size]
                expected = expected[size:]
            assert len(ours) == len(theirs) == len(expected)
            spooled += ours.spooled is not None
    assert spooled  # the overflow path was taken too


def test_spools_only_what_waits_beyond_overflow_and_comes_back_to_memory():
    buffer = OutputBuffer(1000)
    for _ in range(100):  # a keep-alive connection: far more than overflow sent in all
        buffer.append(b'x' * 150)
        buffer.skip(150)
    assert buffer.spooled is None
    buffer.append(b'y' * 1500)
    assert buffer.spooled is not None
    assert buffer.get(1500, True) == b'y' * 1500
    assert buffer.spooled is None and len(buffer) == 0
    buffer.append(b'z')
    assert buffer.get() == b'z' and buffer.chunks


def test_what_is_appended_is_copied_unless_immutable():
    buffer, reused = OutputBuffer(1000), bytearray(b'first')
    buffer.append(memoryview(reused)[:3])
    reused[:] = b'XXXXX'
    assert buffer.get() == b'fir'
