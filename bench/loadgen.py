"""A bounded HTTP/1.1 keep-alive load generator that records every response.

    python3 bench/loadgen.py --port P [--conns 48] [--duration 10] [--max-requests N] --out FILE

Used for the rolling-reload measurement, where wrk's totals are not enough:
it counts responses per 100 ms bucket (CLOCK_MONOTONIC, comparable with the
bench runner's clock) and records every failure with its time.  A response
with `Connection: close` is not a failure: the client reconnects, as any
HTTP client does.  A failure is a refused or reset connection, a connection
closed before the full response, a timeout, or a status other than 200.

Traffic goes to 127.0.0.1 only; it stops by itself after --duration seconds
or --max-requests responses, whichever comes first.
"""
import argparse
import asyncio
import collections
import json
import time

BUCKET = 0.1


class Stats:
    def __init__(self):
        self.ok = 0
        self.buckets = collections.Counter()
        self.failures = []
        self.reconnects = 0


async def client(port, path, stats, start, end, limit, timeout):
    request = f'GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n'.encode()
    reader = writer = None
    while time.monotonic() < end and stats.ok < limit:
        try:
            if writer is None:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection('127.0.0.1', port), timeout)
            writer.write(request)
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
            now = time.monotonic()
            if status == '200':
                stats.ok += 1
                stats.buckets[int((now - start) / BUCKET)] += 1
            else:
                stats.failures.append((now, f'status {status}'))
            if close:
                stats.reconnects += 1
                writer.close()
                reader = writer = None
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError,
                asyncio.LimitOverrunError, ValueError, IndexError) as error:
            stats.failures.append((time.monotonic(), repr(error)[:200]))
            if writer is not None:
                writer.close()
            reader = writer = None
            await asyncio.sleep(0.01)
    if writer is not None:
        writer.close()


async def main_async(args):
    stats = Stats()
    start = time.monotonic()
    end = start + args.duration
    await asyncio.gather(*(client(args.port, args.path, stats, start, end, args.max_requests, args.timeout)
                           for _ in range(args.conns)))
    return start, stats


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--port', type=int, required=True)
    parser.add_argument('--path', default='/')
    parser.add_argument('--conns', type=int, default=48)
    parser.add_argument('--duration', type=float, default=10.0)
    parser.add_argument('--max-requests', type=int, default=2_000_000)
    parser.add_argument('--timeout', type=float, default=5.0)
    parser.add_argument('--out', required=True)
    args = parser.parse_args()
    start, stats = asyncio.run(main_async(args))
    buckets = max(stats.buckets, default=0) + 1
    with open(args.out, 'w') as file:
        json.dump({'start': start, 'bucket': BUCKET, 'ok': stats.ok,
                   'per_bucket': [stats.buckets.get(i, 0) for i in range(buckets)],
                   'reconnects': stats.reconnects,
                   'failures': stats.failures}, file)


if __name__ == '__main__':
    main()
