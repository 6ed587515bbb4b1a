"""Upstreams on loopback that write raw bytes: for tests of upstreams that break HTTP.

`RawUpstream` hands each request it reads to a function of the test's, which
writes whatever bytes it likes on the connection (a cut head, an interim
answer, a lying length, a trickle) and says whether the connection stays open
for the next request: keep-alive, so a test can see what the proxy's pooled
connection does with what came before.  `ScriptedUpstream` is the simple
case: an answer scripted per path, the connection closed after it.

Every request head is kept, in order, in `requests`, for tests of what the
proxy sent upstream.
"""

import socket
import threading

PING_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"


def response(status="200 OK", headers=(), body=b"", version="HTTP/1.1"):
    """An answer's bytes exactly as given: no header is added, none is checked."""
    return ("\r\n".join([f"{version} {status}", *headers]) + "\r\n\r\n").encode("latin-1") + body


class Request:
    """One request head as the upstream read it."""

    def __init__(self, head, connection_number, index):
        self.head = head                    # the raw bytes, up to and with the blank line
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        self.method, self.target = line.split(" ")[:2]
        self.path = self.target.partition("?")[0]
        self.connection_number = connection_number  # 1 for the first connection accepted
        self.index = index                  # 0 for the first request on its connection

    def header(self, name):
        """The first value of header `name`, None if absent."""
        for line in self.head.decode("latin-1").split("\r\n")[1:]:
            field, _, value = line.partition(":")
            if field.strip().lower() == name.lower():
                return value.strip()
        return None


class RawUpstream:
    """A registry on 127.0.0.1 whose answers a test writes as raw bytes.

    answer(request, connection) writes the answer to `request` on the socket
    `connection` and returns True to read the next request there, False to
    close it.  With ping=True a GET or HEAD of /v2/ (the proxy's check that
    a registry is there) gets 200 and the connection stays open, without
    asking `answer`.  close() stops accepting and closes every connection.
    """

    def __init__(self, answer, ping=True):
        self.answer = answer
        self.ping = ping
        self.requests = []
        self._lock = threading.Lock()
        self._connections = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        threading.Thread(target=self._accept, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def heads(self, contains=""):
        """The raw request heads received that contain `contains`, in order."""
        with self._lock:
            return [request.head for request in self.requests if contains.encode() in request.head]

    def close(self):
        self._listener.close()
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            connection.close()

    def _accept(self):
        number = 0
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            number += 1
            with self._lock:
                self._connections.append(connection)
            threading.Thread(target=self._serve, args=(connection, number), daemon=True).start()

    def _serve(self, connection, number):
        buffered, index = b"", 0
        try:
            while True:
                head, buffered = read_head(connection, buffered)
                if head is None:
                    return
                request = Request(head, number, index)
                with self._lock:
                    self.requests.append(request)
                index += 1
                if self.ping and request.path == "/v2/" and request.method in ("GET", "HEAD"):
                    connection.sendall(PING_ANSWER if request.method == "GET" else PING_ANSWER[:-2])
                elif not self.answer(request, connection):
                    return
        except OSError:
            return  # the proxy went away, or close() closed the connection
        finally:
            with self._lock:
                if connection in self._connections:
                    self._connections.remove(connection)
            connection.close()


def read_head(connection, buffered=b""):
    """(a request head, the bytes after it) from a socket; (None, b"") at its end."""
    data = buffered
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        if not chunk:
            return None, b""
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n", rest


class ScriptedUpstream(RawUpstream):
    """A RawUpstream that answers each path with the raw bytes scripted for it
    in `script`, then closes the connection; /v2/ and a path with no script
    get 200.  A script entry may be a list of byte strings with
    threading.Events between them, which the upstream waits for (up to 30 s):
    a stalled or slow upstream."""

    def __init__(self):
        super().__init__(self._play, ping=False)
        self.script = {}

    def _play(self, request, connection):
        answer = self.script.get(request.path)
        if answer is None:
            answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
        for part in answer if isinstance(answer, list) else [answer]:
            if isinstance(part, threading.Event):
                part.wait(30)
            else:
                connection.sendall(part)
        return False
