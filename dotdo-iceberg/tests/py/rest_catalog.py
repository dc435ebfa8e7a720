"""An Iceberg REST catalog on 127.0.0.1:<port> (0: a free port the system picks) in front of
PyIceberg's SqlCatalog (SQLite file <catalog-db>, warehouse <warehouse-url>), speaking the REST
catalog protocol that iceberg's REST client uses: config, namespaces, and tables (load, create,
commit with the request's requirements checked by PyIceberg). Prints "READY <port>", and exits
when the parent process (the Rust test) goes away or after a hard time limit.

Test controls (not part of the protocol):
  POST /control/lose-next-commit   the next table commit is applied, then its connection is
                                   closed without a reply (a reply lost on the way back)
  POST /control/fail-next-commit   the next table commit is not applied: its connection is
                                   closed before the request is read (a connection that broke
                                   on the way there)
  POST /control/answer-next-commit/<status>[/<times>]
                                   the next table commit (or <times> of them) is not applied: it is answered with
                                   <status> (a 3xx redirects to the same path; a 4xx or 5xx
                                   carries an Iceberg error model), as a proxy or a server
                                   refusing it would
  GET  /control/stats              {"commits": n, "lost": n, "failed": n, "refused": n,
                                    "answered": n,
                                    "by_table": {"ns.table": {"commits": n, "refused": n}}}

Removes <warehouse-dir> (its catalog and tables) when it exits.

usage: rest_catalog.py <port> <catalog-db> <warehouse-url> <warehouse-dir>
"""
import json
import os
import shutil
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

from pyiceberg.catalog.rest import CreateTableRequest
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.exceptions import (
    CommitFailedException,
    NamespaceAlreadyExistsError,
    NoSuchNamespaceError,
    NoSuchTableError,
    TableAlreadyExistsError,
)
from pyiceberg.partitioning import UNPARTITIONED_PARTITION_SPEC
from pyiceberg.table import CommitTableRequest
from pyiceberg.table.sorting import UNSORTED_SORT_ORDER
from pydantic import ValidationError

port, db, warehouse, warehouse_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
limit_s = float(os.environ.get("DOTDO_MOTO_LIMIT_S", "1800"))
catalog = SqlCatalog("dotdo", uri=f"sqlite:///{db}", warehouse=warehouse)
lock = threading.Lock()
state = {
    "lose_next": False,
    "fail_next": False,
    "answer_next": None,
    "commits": 0,
    "lost": 0,
    "failed": 0,
    "refused": 0,
    "answered": 0,
    "by_table": {},
}
ARMS = ("lose_next", "fail_next", "answer_next")


def count(ident, what):
    """Count a commit or a refusal of table `ident` (under `lock`)."""
    state[what] += 1
    table = state["by_table"].setdefault(".".join(ident), {"commits": 0, "refused": 0})
    table[what] += 1


def namespace_of(part):
    # The REST protocol joins a multi-level namespace with the unit separator.
    return tuple(unquote(part).split("\x1f"))


def table_json(table):
    return {
        "metadata-location": table.metadata_location,
        "metadata": json.loads(table.metadata.model_dump_json()),
        "config": {},
    }


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, code, body=None):
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(code)
        if body is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if data and self.command != "HEAD":
            self.wfile.write(data)

    def drop_connection(self):
        """Close the connection without a reply (a reply lost on the way, or a request that never
        arrived, as the client sees it)."""
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)
        return None

    def error(self, code, kind, message):
        self.reply(code, {"error": {"message": message, "type": kind, "code": code}})

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def route(self):
        path = urlparse(self.path).path
        parts = [p for p in path.split("/") if p]
        if parts[:1] == ["control"]:
            return self.control(parts[1:])
        if parts[:1] != ["v1"]:
            return self.error(404, "NotFound", f"no route {path}")
        parts = parts[1:]
        try:
            with lock:
                return self.v1(parts)
        except (NoSuchTableError, NoSuchNamespaceError) as e:
            kind = "NoSuchTableException" if isinstance(e, NoSuchTableError) else "NoSuchNamespaceException"
            return self.error(404, kind, str(e))
        except (TableAlreadyExistsError, NamespaceAlreadyExistsError) as e:
            return self.error(409, "AlreadyExistsException", str(e))
        except CommitFailedException as e:
            return self.error(409, "CommitFailedException", str(e))
        except (ValidationError, ValueError) as e:
            # A request the server cannot take (not "state unknown", which a 500 says).
            return self.error(400, "BadRequestException", f"{type(e).__name__}: {e}")
        except Exception as e:  # noqa: BLE001 - any other failure is the server's
            import traceback

            traceback.print_exc()
            return self.error(500, "ServerError", f"{type(e).__name__}: {e}")

    def control(self, parts):
        armed = {"lose-next-commit": "lose_next", "fail-next-commit": "fail_next"}
        if len(parts) == 1 and parts[0] in armed and self.command == "POST":
            self.body()
            with lock:
                state[armed[parts[0]]] = True
            return self.reply(200, {})
        if len(parts) in (2, 3) and parts[0] == "answer-next-commit" and self.command == "POST":
            self.body()
            with lock:
                state["answer_next"] = (int(parts[1]), int(parts[2]) if len(parts) == 3 else 1)
            return self.reply(200, {})
        if parts == ["stats"]:
            with lock:
                stats = json.loads(
                    json.dumps({k: v for k, v in state.items() if k not in ARMS})
                )
            return self.reply(200, stats)
        return self.error(404, "NotFound", "no such control")

    def v1(self, parts):
        method = self.command
        if parts == ["config"]:
            return self.reply(200, {"defaults": {}, "overrides": {}})
        if parts == ["namespaces"]:
            if method == "GET":
                return self.reply(200, {"namespaces": [list(n) for n in catalog.list_namespaces()]})
            req = json.loads(self.body() or b"{}")
            catalog.create_namespace(tuple(req["namespace"]), req.get("properties") or {})
            return self.reply(200, {"namespace": req["namespace"], "properties": req.get("properties") or {}})
        if len(parts) == 2 and parts[0] == "namespaces":
            ns = namespace_of(parts[1])
            if method == "DELETE":
                catalog.drop_namespace(ns)
                return self.reply(204)
            if method not in ("GET", "HEAD"):
                return self.error(406, "UnsupportedOperationException", f"{method} on a namespace")
            props = catalog.load_namespace_properties(ns)
            if method == "HEAD":
                return self.reply(204)
            return self.reply(200, {"namespace": list(ns), "properties": props})
        if len(parts) == 3 and parts[0] == "namespaces" and parts[2] == "tables":
            ns = namespace_of(parts[1])
            if method == "GET":
                tables = [{"namespace": list(t[:-1]), "name": t[-1]} for t in catalog.list_tables(ns)]
                return self.reply(200, {"identifiers": tables})
            # Optional in the protocol, required fields of PyIceberg's model.
            body = json.loads(self.body())
            for key in ("location", "partition-spec", "write-order"):
                body.setdefault(key, None)
            # An unbound spec's field ids are optional (PyIceberg assigns fresh ones anyway).
            for i, field in enumerate((body.get("partition-spec") or {}).get("fields", [])):
                field.setdefault("field-id", 1000 + i)
            req = CreateTableRequest.model_validate(body)
            table = catalog.create_table(
                ns + (req.name,),
                schema=req.table_schema,
                location=req.location,
                partition_spec=req.partition_spec or UNPARTITIONED_PARTITION_SPEC,
                sort_order=req.write_order or UNSORTED_SORT_ORDER,
                properties=req.properties or {},
            )
            return self.reply(200, table_json(table))
        if len(parts) == 4 and parts[0] == "namespaces" and parts[2] == "tables":
            ident = namespace_of(parts[1]) + (unquote(parts[3]),)
            if method in ("GET", "HEAD"):
                table = catalog.load_table(ident)
                return self.reply(204) if method == "HEAD" else self.reply(200, table_json(table))
            if method == "DELETE":
                catalog.drop_table(ident)
                return self.reply(204)
            if state["fail_next"]:
                state["fail_next"] = False
                state["failed"] += 1
                # Not applied, not answered: the connection breaks before the request is read.
                return self.drop_connection()
            if state["answer_next"] is not None:
                code, times = state["answer_next"]
                state["answer_next"] = (code, times - 1) if times > 1 else None
                state["answered"] += 1
                self.body()
                if 300 <= code < 400:
                    # A proxy moving the endpoint: the same path (a client following it turns
                    # the POST into a GET, 301 to 303, and loads the table unchanged).
                    self.send_response(code)
                    self.send_header("Location", self.path)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                return self.error(code, "ForbiddenException" if code == 403 else "TestAnswer", "answered by the test")
            req = CommitTableRequest.model_validate_json(self.body())
            table = catalog.load_table(ident)
            try:
                response = catalog.commit_table(table, tuple(req.requirements), tuple(req.updates))
            except CommitFailedException:
                count(ident, "refused")
                raise
            count(ident, "commits")
            if state["lose_next"]:
                state["lose_next"] = False
                state["lost"] += 1
                # Applied; the reply never arrives.
                return self.drop_connection()
            return self.reply(
                200,
                {
                    "metadata-location": response.metadata_location,
                    "metadata": json.loads(response.metadata.model_dump_json()),
                },
            )
        return self.error(406, "UnsupportedOperationException", f"not served: {method} {'/'.join(parts)}")

    def do_GET(self):
        self.route()

    def do_HEAD(self):
        self.route()

    def do_POST(self):
        self.route()

    def do_DELETE(self):
        self.route()


ThreadingHTTPServer.request_queue_size = 64
server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
server.daemon_threads = True
threading.Thread(target=server.serve_forever, daemon=True).start()
print("READY", server.server_address[1], flush=True)
parent = os.getppid()
start = time.monotonic()
while os.getppid() == parent and time.monotonic() - start < limit_s:
    time.sleep(0.2)
server.shutdown()
shutil.rmtree(warehouse_dir, ignore_errors=True)
