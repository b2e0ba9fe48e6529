"""Flask, Django and Pyramid apps (bench/frameworks/apps.py) under zkprefork and gunicorn gthread,
both 2 workers x 4 threads, tried as a web developer would (issue 11): a chunked upload, a chunked
multipart upload, server-sent events' arrival times, close() of an endless stream whose client
leaves, a 50 MiB send_file (bytes, status and the workers' CPU time), two 204s on one connection.

    python3 bench/frameworks/compare.py [TREE]     # TREE: the zkprefork checkout (default: this one)

Needs flask, django, pyramid and gunicorn (pip). Everything it starts is stopped by process group.
"""
import atexit, json, os, shutil, signal, socket, subprocess, sys, tempfile, time, psutil
HERE = os.path.dirname(os.path.abspath(__file__))
TREE = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.dirname(HERE))
DIR = tempfile.mkdtemp(prefix='zkprefork-frameworks-')
atexit.register(shutil.rmtree, DIR, True)
with open(os.path.join(DIR, 'big.bin'), 'wb') as f:
    f.write(os.urandom(50 << 20))
with open(os.path.join(DIR, 'small.txt'), 'w') as f:
    f.write('small file content\n')
FW = {'flask': 18701, 'django': 18702, 'pyramid': 18703}
for fw, port in FW.items():
    with open(os.path.join(DIR, f'{fw}.ini'), 'w') as f:
        f.write(f'[app:main]\nuse = call:apps:make\nwhich = {fw}\n\n[server:main]\nuse = egg:zkprefork\n'
                f'host = 127.0.0.1\nport = {port}\nworkers = 2\nthreads = 4\n')
def start(fw, server):
    env = dict(os.environ, PYTHONPATH=HERE, FRAMEWORKS_DIR=DIR)
    if server == 'zkprefork':
        cmd = [sys.executable, '-m', 'zkprefork.cli', os.path.join(DIR, f'{fw}.ini')]; cwd = TREE; port = FW[fw]
    else:
        port = FW[fw] + 100
        cmd = [sys.executable, '-m', 'gunicorn', '-k', 'gthread', '-w', '2', '--threads', '4', '-b', f'127.0.0.1:{port}', f'apps:{fw}_app']; cwd = HERE
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=open(os.path.join(DIR, f'{fw}-{server}.log'), 'w'), stderr=subprocess.STDOUT, start_new_session=True)
    time.sleep(4)
    return p, port
def curl(*args):
    return subprocess.run(['curl', '-s', *args], capture_output=True, text=True, timeout=60)
def events(port):
    s = socket.create_connection(('127.0.0.1', port)); s.settimeout(10)
    t0 = time.monotonic(); s.sendall(b'GET /events HTTP/1.1\r\nHost: x\r\n\r\n'); arr = []; data = b''
    while len(arr) < 3:
        c = s.recv(65536)
        if not c: break
        n = data.count(b'data: '); data += c
        for _ in range(data.count(b'data: ') - n): arr.append(round(time.monotonic() - t0, 2))
    s.close(); return arr
def endless(port, name):
    try: os.unlink(os.path.join(DIR, 'closed.log'))
    except FileNotFoundError: pass
    s = socket.create_connection(('127.0.0.1', port)); s.sendall(b'GET /endless HTTP/1.1\r\nHost: x\r\n\r\n'); s.recv(100); time.sleep(0.3)
    s.close(); t0 = time.monotonic()
    while time.monotonic() - t0 < 5:
        if os.path.exists(os.path.join(DIR, 'closed.log')) and name in open(os.path.join(DIR, 'closed.log')).read():
            return f'close() after {time.monotonic() - t0:.2f} s'
        time.sleep(0.02)
    return 'close() not called within 5 s'
def workers_cpu(p):
    return sum(sum(c.cpu_times()[:2]) for c in psutil.Process(p.pid).children(recursive=True))
for fw in FW:
    for server in ('zkprefork', 'gunicorn'):
        p, port = start(fw, server)
        u = f'http://127.0.0.1:{port}'
        try:
            r = {}
            r['chunked upload'] = curl('-H', 'Transfer-Encoding: chunked', '--data-binary', 'hello world', u + '/upload').stdout
            r['chunked multipart'] = curl('-H', 'Transfer-Encoding: chunked', '-F', 'f=@' + os.path.join(DIR, 'small.txt'), '-F', 'a=b', u + '/upload').stdout
            r['sse arrivals'] = events(port)
            r['endless disconnect'] = endless(port, fw)
            c0 = workers_cpu(p); res = curl('-o', '/dev/null', '-w', '%{size_download} %{http_code}', u + '/file'); r['50MB send_file'] = f'{res.stdout} worker CPU {workers_cpu(p) - c0:.3f} s'
            res = curl('-o', '/dev/null', '-w', '%{http_code} connects=%{num_connects}\n', u + '/nocontent', u + '/nocontent'); r['204 twice'] = res.stdout.replace('\n', '; ')
            print(fw, server, json.dumps(r, indent=1))
        finally:
            os.killpg(p.pid, signal.SIGTERM); p.wait(30)
