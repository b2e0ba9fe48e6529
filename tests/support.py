"""What only the tests need: ini files, load, ZooKeeper ensembles, TLS
material, and readers of each node format; and, re-exported, the processes
under test that the tests share with the demo and the bench
(zkprefork.testing: ZooKeeperServer, ZkpreforkMaster as Server,
ProcessUnderTest, wait_until ...).

Nothing here is a mock: ZooKeeper is Debian's, started on 127.0.0.1 with a
free port and a temporary data dir; zkprefork runs as its own command. Every
process started is stopped by pid (and by process group, so that no orphan
survives a test that kills its master).
"""
import collections
import datetime
import http.client
import json
import os
import re
import socket
import subprocess
import textwrap
import time

import psutil
import pytest

from zkprefork.testing import (  # noqa: F401 (re-exported for the tests)
    ZOOKEEPER_CLASSPATH, ClientThreads, Processes, ProcessUnderTest, ZkpreforkMaster, ZooKeeperServer,
    free_port, kill_tree, wait_until)

HERE = os.path.dirname(os.path.abspath(__file__))


def write_ini(directory, server_options='', app='egg:zkprefork#demo', extra=''):
    """An ini with the demo app and a [server:main] section."""
    path = os.path.join(directory, 'app.ini')
    with open(path, 'w') as file:
        file.write(f'[app:main]\nuse = {app}\n\n[server:main]\nuse = egg:zkprefork\n')
        file.write(textwrap.dedent(server_options))
        file.write(textwrap.dedent(extra))
    return path


# The master under test, as the tests have always called it.
Server = ZkpreforkMaster


def closed_after(sock, limit=6):
    """Seconds until the server closes `sock` (reading and discarding what
    it sends); fails the test if it is still open after `limit` s."""
    start = time.monotonic()
    sock.settimeout(limit)
    try:
        while sock.recv(65536):
            pass
    except socket.timeout:
        pytest.fail(f'the connection is still open after {limit} s')
    except ConnectionResetError:
        pass
    return time.monotonic() - start


def log_times(server, text):
    """The times (epoch s, from the log's millisecond stamps) of the log lines containing text."""
    times = []
    for line in server.log().splitlines():
        stamp = re.match(r'(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ', line)
        if stamp and text in line:
            seconds = datetime.datetime.strptime(stamp.group(1), '%Y-%m-%d %H:%M:%S').timestamp()
            times.append(seconds + int(stamp.group(2)) / 1000)
    return times


def worker_connections(server):
    """The TCP connections (psutil) that the server's workers hold, the listening socket aside."""
    found = []
    for pid in server.worker_pids():
        try:
            found += [c for c in psutil.Process(pid).net_connections('tcp') if c.status != psutil.CONN_LISTEN]
        except psutil.Error:
            pass
    return found


def wait_accepted(server, sock):
    """Wait until a worker has accepted the connection of the client socket sock."""
    port = sock.getsockname()[1]
    wait_until(lambda: any(c.raddr and c.raddr.port == port for c in worker_connections(server)),
               message=f'a worker to accept the connection from port {port}')


def node_data(zk, node):
    data, _ = zk.get(node)
    return json.loads(data)


class Background:
    """A with block runs `self._run()` in a thread until `stopping` is set
    (it must look at least every 0.1 s), then calls `close()`."""

    def __init__(self):
        import threading
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc_info):
        self.stopping.set()
        self.thread.join(5)
        self.close()


class Load(ClientThreads):
    """Concurrent keep-alive HTTP clients hammering a server until stopped.

    Each client keeps one connection open and reconnects only when the
    server says `Connection: close`; any other failure (refused, reset, a
    connection closed without a response, a non-200) is counted.
    """

    def __init__(self, port, clients=50, path='/'):
        import threading
        super().__init__(port, [()] * clients, path)
        self.lock = threading.Lock()
        self.bodies = collections.Counter()

    def _client(self):
        connection = http.client.HTTPConnection('127.0.0.1', self.port, timeout=30)
        while not self.stopping.is_set():
            try:
                connection.request('GET', self.path)
                response = connection.getresponse()
                body = response.read()
                ok = response.status == 200
                if response.will_close:
                    connection.close()
            except (OSError, http.client.HTTPException) as error:
                connection.close()
                body, ok = repr(error).encode(), False
            with self.lock:
                if ok:
                    self.ok += 1
                    self.bodies[body] += 1
                else:
                    self.failures.append(body)
        connection.close()

    def wait_for(self, count, timeout=30):
        start = self.ok
        wait_until(lambda: self.ok >= start + count, timeout, message=f'{count} more responses')


# -- for the registration tests: ZooKeepers of a test's own, TLS material,
# -- and readers of each node format written from its public description --

ZOOKEEPER_TLS_CLASSPATH = ':'.join(
    [ZOOKEEPER_CLASSPATH] + [f'/usr/share/java/{jar}' for jar in (
        'netty-codec.jar', 'netty-resolver.jar', 'netty-transport-native-unix-common.jar')])


class QuorumMember(ZooKeeperServer):
    """One server of a ZooKeeper ensemble (QuorumPeerMain, with myid)."""

    main_class = 'org.apache.zookeeper.server.quorum.QuorumPeerMain'

    def __init__(self, myid, **kwargs):
        super().__init__(**kwargs)
        self.myid = myid
        self.quorum_ports = (free_port(), free_port())

    def start(self, wait=True):
        os.makedirs(os.path.join(self.directory, 'data'), exist_ok=True)
        with open(os.path.join(self.directory, 'data', 'myid'), 'w') as file:
            file.write(f'{self.myid}\n')
        return super().start(wait)


def start_ensemble(size=3, extra=''):
    """`size` QuorumPeerMain servers on 127.0.0.1, started together; a
    one-server 'ensemble' runs as a quorum (standaloneEnabled=false)."""
    members = [QuorumMember(myid) for myid in range(1, size + 1)]
    servers = ''.join(f'server.{m.myid}=127.0.0.1:{m.quorum_ports[0]}:{m.quorum_ports[1]}\n'
                      for m in members)
    for member in members:
        member.extra = 'initLimit=10\nsyncLimit=5\nstandaloneEnabled=false\n' + servers + textwrap.dedent(extra)
    # Each member waits for a quorum before it serves: start them all first.
    try:
        for member in members:
            member.start(wait=False)
        for member in members:
            wait_until(member.serving, timeout=30, message=f'member {member.myid} to serve')
    except BaseException:
        for member in members:
            member.stop()
        raise
    return members


def ensemble_hosts(members, chroot=''):
    return ','.join(m.hosts for m in members) + chroot


def make_tls_files(directory):
    """A throwaway CA, a server certificate for 127.0.0.1, one for another
    name, a client certificate, and a rogue CA with a client certificate of
    its own. PEM files (ZooKeeper reads PEM key stores); returns their paths."""
    import datetime
    import ipaddress
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(text):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    def certificate(subject, key, issuer, issuer_key, ca=False, dns=(), ips=()):
        builder = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
                   # Python 3.13's default contexts verify strictly (VERIFY_X509_STRICT):
                   # without key identifiers, or a CA without key usage, a chain fails.
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                                  critical=False))
        if ca:
            builder = builder.add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
                decipher_only=False), critical=True)
        sans = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def write(filename, *items):
        path = os.path.join(directory, filename)
        with open(path, 'wb') as file:
            for item in items:
                if isinstance(item, x509.Certificate):
                    file.write(item.public_bytes(serialization.Encoding.PEM))
                else:
                    file.write(item.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
        return path

    ca_key, rogue_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    files = {'ca': write('ca.pem', certificate('test CA', ca_key, 'test CA', ca_key, ca=True)),
             'rogue_ca': write('rogue_ca.pem', certificate('rogue CA', rogue_key, 'rogue CA', rogue_key, ca=True))}
    for label, issuer, issuer_key, dns, ips in (
            ('server', 'test CA', ca_key, [], ['127.0.0.1']),
            ('wrong_name_server', 'test CA', ca_key, ['zookeeper.invalid'], []),
            ('client', 'test CA', ca_key, [], ['127.0.0.1']),
            ('rogue_client', 'rogue CA', rogue_key, [], ['127.0.0.1'])):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = certificate(label, key, issuer, issuer_key, dns=dns, ips=ips)
        if label.endswith('server'):
            files[label] = write(f'{label}.pem', key, cert)  # a key store: key and certificate
        else:
            files[label + '_cert'] = write(f'{label}.crt', cert)
            files[label + '_key'] = write(f'{label}.key', key)
    return files


def tls_zookeeper_config(files, key_store='server'):
    """zoo.cfg lines for a TLS client port next to the plain one."""
    return textwrap.dedent(f'''\
        secureClientPort={free_port()}
        secureClientPortAddress=127.0.0.1
        serverCnxnFactory=org.apache.zookeeper.server.NettyServerCnxnFactory
        ssl.keyStore.location={files[key_store]}
        ssl.keyStore.type=PEM
        ssl.trustStore.location={files['ca']}
        ssl.trustStore.type=PEM
        ''')


def secure_port(zookeeper):
    return int(re.search(r'secureClientPort=(\d+)', zookeeper.extra).group(1))


def registrar_of(server):
    """The registrar process of a zkprefork master (by its title)."""
    def find():
        for child in server.children():
            try:
                if 'registrar' in ' '.join(child.cmdline()):
                    server.seen_pids.add(child.pid)
                    return child
            except psutil.NoSuchProcess:
                pass
        return None
    return wait_until(find, timeout=10, message='the registrar process')


def dead_pid():
    """The pid of a process that has exited and been reaped."""
    process = subprocess.Popen(['true'])
    process.wait()
    return process.pid


# Readers of the node formats, each written from that format's public
# description only (not from zkprefork's code), as a client would read nodes.

def read_zk_node(name, data):
    """zc.zk / zc.zkzopeserver: the name is host:port ([v6]:port); the data
    is a JSON object whose pid is an int."""
    host, _, port = name.rpartition(':')
    value = json.loads(data)
    assert isinstance(value, dict) and isinstance(value['pid'], int)
    return host.strip('[]'), int(port), value


SERVERSET_STATUSES = ('DEAD', 'STARTING', 'ALIVE', 'STOPPING', 'STOPPED', 'WARNING', 'UNKNOWN')


def read_serverset_member(name, data):
    """Finagle's ServerSet entry (serverset2 Entry/Endpoint.parseJson):
    only children named member_*; serviceEndpoint and each of
    additionalEndpoints is {"host": str, "port": int}; status is a known
    name; shard an int if present; metadata a map of strings if present."""
    if not name.startswith('member_'):
        return None
    value = json.loads(data)

    def endpoint(item):
        assert isinstance(item['host'], str) and type(item['port']) is int
        return item['host'], item['port']
    entry = {'service': endpoint(value['serviceEndpoint']),
             'additional': {key: endpoint(item) for key, item in value.get('additionalEndpoints', {}).items()},
             'status': value['status'], 'shard': value.get('shard'),
             'metadata': value.get('metadata', {})}
    assert entry['status'] in SERVERSET_STATUSES
    assert entry['shard'] is None or type(entry['shard']) is int
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in entry['metadata'].items())
    return entry


def read_synapse_backend(name, data, endpoint_name=None):
    """Synapse's zookeeper watcher with `decode: {method: serverset}`: the
    backend is serviceEndpoint (or the named additional endpoint), named by
    the shard; its id is the numeric suffix of the child's name."""
    decoded = json.loads(data)
    backend = dict(decoded['additionalEndpoints'][endpoint_name] if endpoint_name
                   else decoded['serviceEndpoint'])
    backend['name'] = str(decoded['shard']) if decoded.get('shard') is not None else None
    assert 'host' in backend and 'port' in backend
    suffix = name.split('_')[-1]
    backend['id'] = int(suffix) if suffix.isdigit() else None
    return backend


CURATOR_FIELDS = {'name', 'id', 'address', 'port', 'sslPort', 'payload', 'registrationTimeUTC',
                  'serviceType', 'uriSpec'}


def read_curator_instance(service_name, child_name, data):
    """Curator x-discovery's ServiceInstance as JsonInstanceSerializer
    reads it in compatible mode: no field beyond the classic ones (old
    clients fail on unknown properties); name, id, address required; port
    and/or sslPort; serviceType one of Curator's; the node named by the id
    under the service's path."""
    value = json.loads(data)
    assert set(value) <= CURATOR_FIELDS, set(value) - CURATOR_FIELDS
    assert value['name'] == service_name and value['id'] == child_name
    assert isinstance(value['address'], str)
    assert isinstance(value.get('port'), int) or isinstance(value.get('sslPort'), int)
    assert value['serviceType'] in ('DYNAMIC', 'STATIC', 'PERMANENT', 'DYNAMIC_SEQUENTIAL')
    assert isinstance(value['registrationTimeUTC'], int)
    return value
