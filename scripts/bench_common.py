"""Helpers the bench-*.py scripts share: free ports, waiting for a server, naming the CPU."""
import http.client
import json
import platform
import socket
import struct
import time


def free_port():
    """A loopback port nothing listens on (now)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_http(port, path, timeout=180, ok=lambda status: status == 200):
    """Waits until GET `path` on loopback `port` answers a status `ok` accepts."""
    t = time.time()
    while time.time() - t < timeout:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", path)
            if ok(c.getresponse().status):
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"nothing ready on port {port}{path}")


def cpu():
    """The CPU's model name, for every figure a benchmark prints."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def sse_chunks(response):
    """The JSON objects of a streamed response's `data: {...}` lines, each as it arrives."""
    buf = b""
    while True:
        data = response.read1(65536)
        if not data:
            return
        buf += data
        while b"\n" in buf:
            line, _, buf = buf.partition(b"\n")
            if line.startswith(b"data: {"):
                yield json.loads(line[6:])


def frame(p, obj):
    """One request to a runner process over its framed protocol (docs/runner-protocol.md)."""
    b = json.dumps(obj).encode()
    p.stdin.write(struct.pack("<I", len(b)) + b)
    p.stdin.flush()


def read(p):
    """One frame from a runner process."""
    n = struct.unpack("<I", p.stdout.read(4))[0]
    return json.loads(p.stdout.read(n))
