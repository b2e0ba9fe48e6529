"""A bounded HTTP/1.1 load generator that records every response, per
connection and per 100 ms.

    python3 bench/loadgen.py --port P [--conns 48] [--duration 10] [--max-requests N]
                             [--header 'Connection: close'] [--tls] --out FILE

wrk's totals cannot say whether every connection was served (a server
whose threads each hold one keep-alive connection serves a few of them and
leaves the others waiting); this counts the responses of each connection
(each client: it reconnects after `Connection: close`, as any HTTP client
does) and per 100 ms bucket (CLOCK_MONOTONIC, comparable with the bench
runner's clock), and records every failure with its time. A failure is a
refused or reset connection, a connection closed before the full
response, a timeout, or a status other than 200; a request still waiting
for its response when the time is up is neither a response nor a failure:
it is counted in `waiting_at_end`.

With --tls it speaks HTTPS: every connection a full handshake (Python's
ssl never resumes a session it is not given), the certificate not
verified (it is the bench's own, made for the run: what is measured is how
the responses spread, not the certificate).

Traffic goes to 127.0.0.1 only; it stops by itself after --duration seconds
or --max-requests responses, whichever comes first. The output (JSON):
start, bucket, ok, per_bucket, per_connection, waiting_at_end, reconnects,
failures [(monotonic time, error)].
"""
import argparse
import asyncio
import collections
import json
import ssl
import time

BUCKET = 0.1


class Stats:
    def __init__(self, conns):
        self.ok = 0
        self.buckets = collections.Counter()
        self.per_connection = [0] * conns
        self.waiting_at_end = 0
        self.failures = []
        self.reconnects = 0


async def read_response(reader, timeout):
    """(status, close) of one response with Content-Length (or none)."""
    head = await asyncio.wait_for(reader.readuntil(b'\r\n\r\n'), timeout)
    lines = head.decode('latin-1').split('\r\n')
    status = lines[0].split(' ', 2)[1]
    length, close = 0, False
    for line in lines[1:]:
        name, _, value = line.partition(':')
        name = name.strip().lower()
        if name == 'content-length':
            length = int(value)
        elif name == 'connection' and value.strip().lower() == 'close':
            close = True
    if length:
        await asyncio.wait_for(reader.readexactly(length), timeout)
    return status, close


async def client(index, args, request, stats, start, end):
    reader = writer = None
    while (now := time.monotonic()) < end and stats.ok < args.max_requests:
        # No wait outlasts the run: a response still awaited then is not a failure.
        timeout = min(args.timeout, end - now)
        try:
            if writer is None:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection('127.0.0.1', args.port, ssl=args.ssl_context), timeout)
            writer.write(request)
            status, close = await read_response(reader, timeout)
            now = time.monotonic()
            if now >= end:  # outstanding when the time was up: other clients closing may have let it through
                stats.waiting_at_end += 1
                break
            if status == '200':
                stats.ok += 1
                stats.per_connection[index] += 1
                stats.buckets[int((now - start) / BUCKET)] += 1
            else:
                stats.failures.append((now, f'status {status}'))
            if close:
                stats.reconnects += 1
                writer.close()
                reader = writer = None
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ValueError, IndexError) as error:
            if isinstance(error, asyncio.TimeoutError) and timeout < args.timeout and time.monotonic() >= end:
                stats.waiting_at_end += 1
                break
            stats.failures.append((time.monotonic(), repr(error)[:200]))
            if writer is not None:
                writer.close()
            reader = writer = None
            await asyncio.sleep(0.01)  # a refused connection must not spin
    if writer is not None:
        writer.close()


async def main_async(args):
    stats = Stats(args.conns)
    headers = ''.join(f'{header}\r\n' for header in args.header)
    request = f'GET {args.path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}\r\n'.encode()
    start = time.monotonic()
    end = start + args.duration
    await asyncio.gather(*(client(index, args, request, stats, start, end) for index in range(args.conns)))
    return start, stats


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--port', type=int, required=True)
    parser.add_argument('--path', default='/')
    parser.add_argument('--conns', type=int, default=48)
    parser.add_argument('--duration', type=float, default=10.0)
    parser.add_argument('--max-requests', type=int, default=2_000_000)
    parser.add_argument('--timeout', type=float, default=5.0)
    parser.add_argument('--header', action='append', default=[], help='a request header, NAME: VALUE')
    parser.add_argument('--tls', action='store_true', help='HTTPS (the certificate is not verified)')
    parser.add_argument('--out', required=True)
    args = parser.parse_args()
    args.ssl_context = ssl._create_unverified_context() if args.tls else None
    start, stats = asyncio.run(main_async(args))
    buckets = max(stats.buckets, default=0) + 1
    with open(args.out, 'w') as file:
        json.dump({'start': start, 'bucket': BUCKET, 'ok': stats.ok,
                   'per_bucket': [stats.buckets.get(i, 0) for i in range(buckets)],
                   'per_connection': stats.per_connection,
                   'waiting_at_end': stats.waiting_at_end,
                   'reconnects': stats.reconnects,
                   'failures': stats.failures}, file)


if __name__ == '__main__':
    main()
