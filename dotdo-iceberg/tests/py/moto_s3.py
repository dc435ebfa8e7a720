"""Start moto's S3 server on 127.0.0.1:<port> (0: a free port the system picks), create <bucket>,
print "READY <port>", and exit when the parent process (the Rust test) goes away or after a hard
time limit."""
import os
import sys
import time
import urllib.request

from moto.server import ThreadedMotoServer

port, bucket = int(sys.argv[1]), sys.argv[2]
limit_s = float(os.environ.get("DOTDO_MOTO_LIMIT_S", "1800"))
server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
server.start()
port = server.get_host_and_port()[1]
req = urllib.request.Request(f"http://127.0.0.1:{port}/{bucket}", method="PUT")
urllib.request.urlopen(req).read()
print("READY", port, flush=True)
parent = os.getppid()
start = time.monotonic()
try:
    while os.getppid() == parent and time.monotonic() - start < limit_s:
        time.sleep(0.2)
finally:
    server.stop()
